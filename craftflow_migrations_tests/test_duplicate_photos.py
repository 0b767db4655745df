"""Duplicates on real photographs, end to end: files on a share, imported, grouped, reported.

The photographs come from packages that ship them (the ``photos`` extra; see
``benchmarks/real_photos.py``); never scikit-image's, which are held out. Tiles of one
photograph are the hardest negatives there are: same light, colour and texture.
"""

import re
from datetime import datetime, timezone
from itertools import combinations

import dagster as dg
from PIL import Image
from sqlalchemy import text

from benchmarks.real_photos import corpus, sources
from craftflow_migrations.db import get_engine
from craftflow_migrations.duplicates.assets import design_duplicates
from craftflow_migrations.duplicates.grouping import Group, ImageRow
from craftflow_migrations.duplicates.report import PAGE_SIZE, write_report
from craftflow_migrations.resources import PostgresResource

from .support import import_local_folder
from .test_ui import rendered_dom

FIVE_AND_HARDER = ["jpeg re-encode", "half size", "3% crop", "+10% brightness", "text watermark", "5% crop",
                   "3% crop, then jpeg"]


def test_real_photographs_group_by_source_through_import_and_asset(migrated_url, instance, tmp_path):
    base = tmp_path / "nas"
    truth = {}
    for sample in corpus():
        if sample.edit != "original" and sample.edit not in FIVE_AND_HARDER:
            continue
        folder = base / "Photo Shop" / sample.source.split("-")[0]
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{sample.source} {sample.edit.replace('%', 'pc')}.img"
        (folder / name).write_bytes(sample.data)
        truth[name] = sample.source
    import_local_folder(migrated_url, base)
    result = dg.materialize([design_duplicates], instance=instance,
                            resources={"postgres": PostgresResource(database_url=migrated_url)},
                            run_config={"ops": {"design_duplicates": {"config": {"report_dir": str(tmp_path / "r")}}}})
    assert result.success
    meta = result.asset_materializations_for_node("design_duplicates")[0].metadata
    assert meta["pairs_confirmed_on_thumbnails"].value > 0

    with get_engine(migrated_url).connect() as conn:
        rows = conn.execute(text(
            "SELECT m.group_id, d.path FROM design_duplicate_members m JOIN design_images d ON d.id = m.image_id"))
        group_of = {r.path.rsplit("/", 1)[-1]: r.group_id for r in rows}
    tp = fp = fn = 0
    for a, b in combinations(sorted(truth), 2):
        together = a in group_of and group_of.get(a) == group_of.get(b)
        same = truth[a] == truth[b]
        tp, fp, fn = tp + (together and same), fp + (together and not same), fn + (same and not together)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision == 1.0, f"{fp} pairs of different photographs grouped"
    assert recall >= 0.95, f"pair recall {recall:.3f}"
    # One group per source design, never two.
    assert len(set(group_of.values())) == len({truth[n] for n in group_of})


def test_report_pages_a_large_scope_and_every_thumbnail_loads(tmp_path):
    tiles = sources()[:6]
    thumbs = {}
    groups = []
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for n in range(PAGE_SIZE + 7):  # two pages
        name, tile = tiles[n % len(tiles)]
        members = []
        for k in range(2):
            sha = f"{n:032x}{k:032x}"
            image = tile.rotate(n * 7 + k, fillcolor=(255, 255, 255)).resize((96, 96))
            path = tmp_path / "t.jpg"
            image.save(path, quality=70)
            thumbs[sha] = path.read_bytes()
            members.append(ImageRow(n * 2 + k, "tenant:9", f"Shop {k}", "T", f"Shop {k}/T/{name} {n}.jpg", sha,
                                    "0" * 64, 96, 96, "JPEG", t0, 1000 * (n + 1)))
        groups.append(Group("near", "tenant:9", members, members[0], "highest resolution", {0: 0}, id=n + 1))
    for g in groups:
        g.distances = {m.id: 0 for m in g.members}
    index = write_report(groups, tmp_path / "report", lambda shas: {s: thumbs[s] for s in shas},
                         {"tenant:9": "Big Tenant (tenant 9)"})
    html = index.read_text()
    # The index in the browser: the tenant with its groups and bytes, and a row per shop.
    shown = rendered_dom(index.as_uri())
    tenant = re.search(r'<tr class="scope" data-scope="tenant:9">(.*?)</tr>', shown, re.S).group(1)
    assert "Big Tenant (tenant 9)" in tenant and f'<td class="num">{PAGE_SIZE + 7}</td>' in tenant
    assert shown.count('<tr class="shop"') == 2 and 'data-shop="Shop 0"' in shown and 'data-shop="Shop 1"' in shown
    page = re.search(r'href="(pages-\d+/[^"]+)/page-1\.html"', html).group(1)
    assert (index.parent / page / "page-2.html").exists() and not (index.parent / page / "page-3.html").exists()
    dom = rendered_dom((index.parent / page / "page-2.html").as_uri())
    assert 'data-thumbs-total="14"' in dom and 'data-thumbs-loaded="14"' in dom
    assert re.findall(r'data-group-id="(\d+)"', dom)[0] == "7"  # biggest saving first: group 57 ... 8, then 7
    first = rendered_dom((index.parent / page / "page-1.html").as_uri())
    assert first.count('class="group near"') == PAGE_SIZE and 'href="page-2.html"' in first
    # A second run replaces the pages whole and removes the old ones.
    again = write_report(groups[:3], tmp_path / "report", lambda shas: {s: thumbs[s] for s in shas})
    assert len(list(again.parent.glob("pages-*"))) == 1
    stored = sorted((again.parent / "thumbs").glob("*/*.jpg"))
    assert len(stored) == len(thumbs) and all(p.parent.name == p.name[:2] for p in stored)
    Image.open(stored[0]).verify()


def test_thumbnails_join_the_same_pairs_in_a_process_pool(monkeypatch):
    from craftflow_migrations.duplicates import similarity
    from craftflow_migrations.nas.hashing import describe_image

    samples = [s for s in corpus() if s.source.startswith(("china", "aero"))][:24]
    thumbs = {str(k): describe_image(s.data).thumbnail for k, s in enumerate(samples)}
    thumbs["broken"] = b"not a picture"
    pairs = [(a, b, str(a), str(b)) for a in range(len(samples)) for b in range(a + 1, len(samples))]
    # Two components of the candidate graph, and pairs no thumbnail can decide.
    components = [pairs, [(100, 101, "0", "missing"), (100, 102, "0", "broken")]]
    monkeypatch.setattr(similarity, "PARALLEL_FROM", 1)
    alone = similarity.confirm_pairs(components, thumbs, workers=1)
    pooled = similarity.confirm_pairs(components, thumbs, workers=2)
    assert set(alone.joins) == set(pooled.joins) and alone.joins and alone.unchecked == pooled.unchecked == 2
    assert (alone.checked, alone.confirmed) == (pooled.checked, pooled.confirmed)
    assert all(samples[a].source == samples[b].source for a, b in alone.joins)
    # Every pair scored: the same components, with pairs joined already never scored.
    made = {str(k): similarity.features(thumbs[str(k)]) for k in range(len(samples))}
    everything = {(a, b) for a, b, sa, sb in pairs if similarity.score(made[sa], made[sb]) >= similarity.SAME_PICTURE}
    assert alone.checked < len(pairs) and alone.confirmed == len(alone.joins)
    assert _components(everything) == _components(set(alone.joins))


def _components(edges: set[tuple[int, int]]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for a, b in edges:
        joined = groups.get(a, {a}) | groups.get(b, {b})
        for member in joined:
            groups[member] = joined
    return {frozenset(g) for g in groups.values()}
