"""Duplicate groups from generated images: near copies group, unrelated designs do not."""

import csv
import json
import random
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from PIL import Image
from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.duplicates.assets import (
    design_duplicates,
    failed_share_under_limit,
    hashes_use_current_algorithm,
)
from craftflow_migrations.duplicates.grouping import ImageRow, choose_keep, find_groups
from craftflow_migrations.nas import store as nas_store
from craftflow_migrations.nas.assets import design_images
from craftflow_migrations.nas.resource import NasResource
from craftflow_migrations.resources import PostgresResource
from craftflow_migrations.sample_nas import near_copies

from .conftest import cli_env
from .support import import_local_folder, photo_like, write_bad_files
from .test_ui import rendered_dom

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def nas_folder(tmp_path):
    """Three designs with near copies across two shops of one tenant; three unrelated designs."""
    base = tmp_path / "G"
    for n in range(3):
        original = photo_like(1200, 900, 10 + n)
        shop_a, shop_b = base / "Shop A" / "Posters", base / "Shop B" / "Canvas"
        shop_a.mkdir(parents=True, exist_ok=True)
        shop_b.mkdir(parents=True, exist_ok=True)
        original.save(shop_a / f"design{n}.png")
        original.save(shop_a / f"design{n}.jpg", quality=85)  # re-encoded
        for label, image in near_copies(original).items():
            image.save(shop_b / f"design{n} {label}.jpg", quality=90)
    for n in range(3):
        folder = base / "Other Tenant" / "Misc"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(1200, 900, 50 + n).save(folder / f"unrelated{n}.jpg", quality=90)
    (base / "Other Tenant" / "Misc" / "design0 copy.png").write_bytes((base / "Shop A/Posters/design0.png").read_bytes())
    return base


def import_folder(url: str, base) -> None:
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, slug) VALUES (1, 'Acme', 'acme'), (2, 'Other', 'other')"))
        conn.execute(text("INSERT INTO shops (tenant_id, name, platform) VALUES "
                          "(1, 'Shop A', 'etsy'), (1, 'Shop B', 'shopify'), (2, 'Other Tenant', 'etsy')"))
    done = import_local_folder(url, base)
    with engine.begin() as conn:
        nas_store.link_shops(conn, (li.folder.shop for li in done["listings"].values()))


def rows_from_db(url: str) -> list[ImageRow]:
    from craftflow_migrations.duplicates.store import load_images

    with get_engine(url).connect() as conn:
        return load_images(conn)


def test_near_copies_group_and_unrelated_do_not(migrated_url, nas_folder):
    import_folder(migrated_url, nas_folder)
    rows = rows_from_db(migrated_url)
    groups = find_groups(rows)
    near = [g for g in groups if g.kind == "near"]
    assert len(near) == 3
    for n, g in enumerate(sorted(near, key=lambda g: g.members[0].path)):
        names = {m.path.split("/")[-1] for m in g.members}
        labels = near_copies(Image.new("RGB", (100, 100)))
        assert names == {f"design{n}.png", f"design{n}.jpg", *(f"design{n} {label}.jpg" for label in labels)}
        assert {m.shop for m in g.members} == {"Shop A", "Shop B"}  # across shops of one tenant
        assert g.keep.path.endswith(f"design{n}.png") and "lossless PNG" in g.keep_reason
    # The byte-identical copy in another tenant's shop is not grouped with tenant 1's files.
    assert [g for g in groups if g.kind == "exact"] == []
    # Deterministic: the same groups whatever order rows come in.
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    assert [[m.id for m in g.members] for g in find_groups(shuffled)] == [[m.id for m in g.members] for g in groups]


def hash_with(bits: set[int]) -> str:
    value = 0
    for b in bits:
        value |= 1 << (255 - b)
    return f"{value:064x}"


def row(i: int, phash: str, sha: str | None = None, w=100, h=100, fmt="JPEG", age=0) -> ImageRow:
    return ImageRow(i, "tenant:1", "S", "T", f"S/T/{i}.jpg", sha or f"{i:064x}", phash, w, h, fmt,
                    T0 + timedelta(days=age))


def test_chains_join_and_threshold_holds():
    a = hash_with(set())
    b = hash_with(set(range(0, 15)))      # 15 from a
    c = hash_with(set(range(15, 30)))     # 15 from a? no: 15 from... b->c = 30; a->c = 15
    d = hash_with(set(range(30, 60)))     # 30 from a, 45 from b
    groups = find_groups([row(1, a), row(2, b), row(3, c), row(4, d)], threshold=22)
    assert len(groups) == 1 and [m.id for m in groups[0].members] == [1, 2, 3]
    chain = find_groups([row(1, hash_with(set(range(0, 20)))), row(2, a), row(3, hash_with(set(range(20, 40))))],
                        threshold=22)
    assert [m.id for m in chain[0].members] == [1, 2, 3]  # 1 and 3 are 40 apart, joined through 2
    assert find_groups([row(1, a), row(2, hash_with(set(range(23))))], threshold=22) == []
    assert len(find_groups([row(1, a), row(2, hash_with(set(range(22))))], threshold=22)) == 1


def test_the_pair_search_finds_the_same_pairs_on_threads_as_in_one(monkeypatch):
    """The orders run on threads from 20,000 hashes; each order's bits are drawn before any runs,
    so the pairs and distances are exactly those of the orders run one after another."""
    import numpy as np

    from craftflow_migrations.duplicates import candidates

    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**63, size=(30_000, 4), dtype=np.uint64)
    flips = rng.integers(0, 2**63, size=(300, 4), dtype=np.uint64) & rng.integers(0, 2**63, size=(300, 4),
                                                                                  dtype=np.uint64)
    words[-300:] = words[:300] ^ (flips & rng.integers(0, 2**63, size=(300, 4), dtype=np.uint64))
    scopes = rng.integers(0, 3, size=30_000)
    scopes[-300:] = scopes[:300]
    threaded = candidates.candidate_pairs(words, scopes, 80)
    monkeypatch.setattr(candidates, "_THREADS_FROM", 10**9)
    one = candidates.candidate_pairs(words, scopes, 80)
    assert len(threaded[0]) >= 250  # most planted pairs (about 32 bits apart) are found
    assert np.array_equal(threaded[0], one[0]) and np.array_equal(threaded[1], one[1])


def test_keep_rule():
    big, small = row(1, "0" * 64, w=4000, h=3000), row(2, "0" * 64, w=2000, h=1500, age=-9)
    assert choose_keep([small, big]) == (big, "highest resolution (4000×3000)")
    png, jpg = row(3, "0" * 64, fmt="PNG", age=5), row(4, "0" * 64, fmt="JPEG")
    assert choose_keep([jpg, png])[0] is png
    old, new = row(5, "0" * 64, age=1), row(6, "0" * 64, age=2)
    keep, reason = choose_keep([new, old])
    assert keep is old and reason.startswith("same resolution and kind of format; oldest")


def test_asset_tables_report_and_cli(migrated_url, nas_folder, instance, tmp_path, clean_nas_env):
    clean_nas_env.setenv("NAS_BASE_PATH", str(nas_folder))
    import_folder(migrated_url, nas_folder)
    write_bad_files(nas_folder / "Shop A" / "Broken")
    import_local_folder(migrated_url, nas_folder, ["Shop A/Broken"])
    report_dir = tmp_path / "report"
    result = dg.materialize(
        [design_images, design_duplicates, hashes_use_current_algorithm, failed_share_under_limit],
        selection=dg.AssetSelection.assets(design_duplicates) | dg.AssetSelection.checks_for_assets(design_images),
        instance=instance,
        resources={"postgres": PostgresResource(database_url=migrated_url), "nas": NasResource()},
        run_config={"ops": {"design_duplicates": {"config": {"report_dir": str(report_dir)}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("design_duplicates")[0].metadata
    assert meta["near_groups"].value == 3 and meta["exact_groups"].value == 0
    assert meta["report"].value == (report_dir / "index.html").resolve().as_uri()
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["hashes_use_current_algorithm"].passed
    assert not checks["failed_share_under_limit"].passed  # 3 broken of 24 files is over 5%
    assert checks["failed_share_under_limit"].metadata["failed"].value == 3

    with get_engine(migrated_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM design_duplicate_groups")).scalar() == 3
        assert conn.execute(text("SELECT count(*) FROM design_duplicate_members WHERE is_keep")).scalar() == 3

    index = (report_dir / "index.html").read_text()
    dom = rendered_dom((report_dir / "index.html").as_uri())
    assert 'data-scope="tenant:1"' in dom and "Acme (tenant 1)" in dom
    assert 'data-shop="Shop A"' in dom and 'data-shop="Shop B"' in dom
    page = re.search(r'href="(pages-\d+/[^"]+/page-1\.html)"', index).group(1)
    scope_dom = rendered_dom((report_dir / page).as_uri())
    assert 'data-thumbs-total="18"' in scope_dom and 'data-thumbs-loaded="18"' in scope_dom
    assert "All tenants and shops" in scope_dom
    with open(report_dir / page.replace("page-1.html", "copies.csv"), newline="") as fh:
        copies = list(csv.DictReader(fh))
    assert len(copies) == 18 - 3 and all(c["keep_path"].endswith(".png") for c in copies)

    env = cli_env()
    out = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "duplicates", "--shop", "Shop B", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)
    assert len(groups) == 3
    assert all(g["keep"]["path"].endswith(".png") and g["keep"]["shop"] == "Shop A" for g in groups)
    assert {m["template"] for g in groups for m in g["members"]} == {"Posters", "Canvas"}
    # The same groups, in the same order, as the report's page of that tenant.
    assert [g["id"] for g in groups] == [int(i) for i in re.findall(r'data-group-id="(\d+)"', scope_dom)]
    assert all(g["bytes_freed"] == sum(m["size_bytes"] for m in g["members"] if not m["keep"]) > 0 for g in groups)
    text_out = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "duplicates", "--shop", "Shop A"],
                              env=env, capture_output=True, text=True, timeout=120).stdout
    assert text_out.count("near group") == 3 and "keep Shop A/Posters/design0.png" in text_out


def test_only_scopes_whose_images_changed_are_regrouped(migrated_url, nas_folder, instance, tmp_path):

    import_folder(migrated_url, nas_folder)
    engine = get_engine(migrated_url)

    def materialize() -> dict:
        result = dg.materialize([design_duplicates], instance=instance,
                                resources={"postgres": PostgresResource(database_url=migrated_url)},
                                run_config={"ops": {"design_duplicates": {"config": {"report_dir": str(tmp_path)}}}})
        return {k: v.value for k, v in result.asset_materializations_for_node("design_duplicates")[0].metadata.items()}

    first = materialize()
    assert first["near_groups"] == 3 and first["scopes_regrouped"] == 2
    with engine.connect() as conn:
        assert not nas_store.duplicates_pending(conn)
        before = conn.execute(text("SELECT id FROM design_duplicate_groups ORDER BY id")).scalars().all()
    again = materialize()  # nothing changed: nothing regrouped, the groups stay as they are
    assert again["scopes_regrouped"] == 0 and again["images_regrouped"] == 0 and again["near_groups"] == 3
    with engine.begin() as conn:
        assert conn.execute(text("SELECT id FROM design_duplicate_groups ORDER BY id")).scalars().all() == before
        nas_store.mark_shops_changed(conn, ["Other Tenant"])
    third = materialize()  # only tenant 2's scope: tenant 1's groups keep their ids
    assert third["scopes_regrouped"] == 1 and third["near_groups"] == 3
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM design_duplicate_groups ORDER BY id")).scalars().all() == before


def test_one_group_per_design_with_its_exact_copies_inside():
    a = hash_with(set())
    original, copy, resized = row(1, a, sha="1" * 64), row(2, a, sha="1" * 64), row(3, hash_with({5, 9}), w=50, h=50)
    twin_a, twin_b = row(4, hash_with(set(range(100, 200))), sha="2" * 64), row(5, hash_with(set(range(100, 200))),
                                                                               sha="2" * 64)
    groups = find_groups([original, copy, resized, twin_a, twin_b])
    assert [(g.kind, [m.id for m in g.members]) for g in groups] == [("exact", [4, 5]), ("near", [1, 2, 3])]


def test_shop_names_with_tabs_newlines_and_backslashes_keep_their_scope(migrated_url, instance, tmp_path):
    """Folder names are data: a scope read back must be the scope written, or old groups linger."""
    from craftflow_migrations.nas.phash_algorithm import PHASH_ALGORITHM

    names = ["Tab\tShop", "New\nLine", "Back\\slash", 'Quote"Shop, Ltd']
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        for k, shop in enumerate(names):
            for copy in range(2):  # the same bytes twice: one exact group per shop
                conn.execute(text(
                    "INSERT INTO design_images (shop, template, path, size_bytes, mtime, sha256, phash, "
                    "hash_algorithm, width, height, format) VALUES (:shop, 'T', :path, 10, now(), :sha, :phash, :alg, "
                    "10, 10, 'PNG')"),
                    {"shop": shop, "path": f"{shop}/T/{copy}.png", "sha": f"{k:064x}", "phash": f"{k + 1:064x}",
                     "alg": PHASH_ALGORITHM})
        nas_store.mark_shops_changed(conn, names)

    def materialize() -> None:
        assert dg.materialize([design_duplicates], instance=instance,
                              resources={"postgres": PostgresResource(database_url=migrated_url)},
                              run_config={"ops": {"design_duplicates": {"config": {"report_dir": str(tmp_path)}}}}
                              ).success

    materialize()
    with engine.begin() as conn:
        scopes = conn.execute(text("SELECT scope FROM design_duplicate_groups ORDER BY scope")).scalars().all()
        assert scopes == sorted(f"shop:{n}" for n in names)
        nas_store.mark_shops_changed(conn, names)
    materialize()  # regrouping the same shops replaces their groups, never adds a second set
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM design_duplicate_groups")).scalar() == len(names)
