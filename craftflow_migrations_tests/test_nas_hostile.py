"""What a decade-old NAS share holds, listed and imported for real: nothing stops the import.

The tree is generated with byte names (Latin-1 from old clients), names with newlines,
quotes, semicolons, leading dashes, ``..``, ``%`` and backslashes, symlink loops, links out
of the base, and files that make Pillow raise all sorts of things.
"""

from __future__ import annotations

import io
import os
import random
import struct
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.nas.clients import LocalNasClient, NasError
from craftflow_migrations.nas.hashing import DecodeLimits, describe_image
from craftflow_migrations.nas.listing import list_nas
from craftflow_migrations.nas.names import partition_key, shown, text_of

from .support import import_local_folder, noise_image
from .test_nas_client import open_sftp

ODD_NAMES = ["new\nline.png", "quote ' \" .png", "semi;colon.png", "-rf.png", "a..b.png", "100%.png",
             "back\\slash.png", "tab\there.png"]
LATIN1_FILE = "café.png".encode("latin-1")
LATIN1_TEMPLATE = "Affiches été".encode("latin-1")


def dds_bomb() -> bytes:
    """900 bytes of DDS header declaring 12800x12800 = 164 M uncompressed pixels."""
    w = h = 12800
    pf = struct.pack("<IIIIIIII", 32, 0x40, 0, 32, 0xFF0000, 0xFF00, 0xFF, 0)
    hdr = (b"DDS " + struct.pack("<IIIIIII", 124, 0x1007, h, w, w * 4, 0, 0) + b"\0" * 44 + pf
           + struct.pack("<IIIII", 0x1000, 0, 0, 0, 0))
    return hdr + b"\0" * (900 - len(hdr))


def png_bytes(seed: int, size=(48, 32)) -> bytes:
    out = io.BytesIO()
    noise_image(*size, seed, "RGB").save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def hostile_tree(tmp_path) -> Path:
    base = tmp_path / "Graphics"
    shop = base / "Old Shop"
    normal = shop / "Posters"
    normal.mkdir(parents=True)
    for i, name in enumerate(ODD_NAMES):
        (normal / name).write_bytes(png_bytes(i))
    (normal / "bomb.dds").write_bytes(dds_bomb())
    (normal / "not an image.png").write_text("hello")
    os.symlink(".", normal / "loop")
    os.symlink("..", normal / "loop up")
    os.symlink("/etc", normal / "outside")
    os.symlink("missing.png", normal / "dangling.png")
    # A Latin-1 template folder holding a Latin-1 file name.
    latin = os.path.join(os.fsencode(shop), LATIN1_TEMPLATE)
    os.makedirs(latin)
    with open(os.path.join(latin, LATIN1_FILE), "wb") as fh:
        fh.write(png_bytes(50))
    (base / "Odd\nShop...").mkdir()
    (base / "Odd\nShop..." / "T").mkdir()
    (base / "Odd\nShop..." / "T" / "x.png").write_bytes(png_bytes(60))
    return base


@pytest.mark.parametrize("backend", ["local", "sftp"])
def test_hostile_tree_lists_every_real_file_once(backend, hostile_tree, sshd):
    client = open_sftp(sshd, hostile_tree) if backend == "sftp" else LocalNasClient(hostile_tree)
    with client:
        listings, _ = list_nas(client)
    latin_key = partition_key("Old Shop", text_of(LATIN1_TEMPLATE))
    assert set(listings) == {"Old Shop/Posters", latin_key, "Odd\\x0aShop.\\x2e./T"}
    posters = listings["Old Shop/Posters"]
    names = sorted(f.path.rsplit("/", 1)[1] for f in posters.files)
    assert names == sorted([*ODD_NAMES, "bomb.dds", "not an image.png"])
    assert all(f.raw_path is None for f in posters.files)  # UTF-8 names are stored exactly
    reasons = {p.path.rsplit("/", 1)[1]: p.reason for p in posters.problems}
    assert "loop" in reasons["loop"] and "loop" in reasons["loop up"]
    assert "outside NAS_BASE_PATH" in reasons["outside"]
    assert "broken or loops" in reasons["dangling.png"]
    [latin] = listings[latin_key].files
    assert latin.path == "Old Shop/Affiches \\xe9t\\xe9/caf\\xe9.png"
    assert latin.raw_path == b"Old Shop/" + LATIN1_TEMPLATE + b"/" + LATIN1_FILE
    assert text_of(latin.raw_path) == latin.path


def test_hostile_tree_imports_with_every_failure_recorded(migrated_url, hostile_tree):
    done = import_local_folder(migrated_url, hostile_tree)
    with get_engine(migrated_url).connect() as conn:
        rows = {r.path: r for r in conn.execute(text(
            "SELECT path, path_bytes, status::text AS status, error, phash FROM design_images"))}
    posters = {p.rsplit("/", 1)[1]: r for p, r in rows.items() if p.startswith("Old Shop/Posters/")}
    for name in ODD_NAMES:  # stored exactly, hashed
        assert posters[name].status == "ok" and posters[name].phash, name
    assert posters["bomb.dds"].status == "failed"
    assert "refused before decoding" in posters["bomb.dds"].error
    assert posters["not an image.png"].error == "not an image (format not recognised)"
    latin = rows["Old Shop/Affiches \\xe9t\\xe9/caf\\xe9.png"]
    assert latin.status == "ok" and bytes(latin.path_bytes).endswith(LATIN1_FILE)
    assert rows["Odd\nShop.../T/x.png"].status == "ok"
    assert len(rows) == len(ODD_NAMES) + 4
    assert done["result"].total.imported == len(ODD_NAMES) + 2


def test_a_path_longer_than_the_file_system_allows_is_named_with_what_to_do(tmp_path, sshd):
    """Folders nested past PATH_MAX (4,096 bytes on Linux): the entry where the path runs out
    is recorded with the reason and the fix; the rest of the folder still imports. OpenSSH's
    sftp-server leaves such entries out of its READDIR replies, so over SFTP they are not seen."""
    template = tmp_path / "Shop" / "Deep"
    template.mkdir(parents=True)
    (template / "ok.png").write_bytes(png_bytes(1))
    fd = os.open(template, os.O_RDONLY)
    for _ in range(20):  # 20 x 251 bytes: past PATH_MAX, reachable only relative to a folder
        os.mkdir("d" * 250, dir_fd=fd)
        inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    with LocalNasClient(tmp_path) as client:
        listings, _ = list_nas(client)
    listing = listings["Shop/Deep"]
    assert [f.path for f in listing.files] == ["Shop/Deep/ok.png"]
    [problem] = listing.problems
    assert len(problem.path) > 4096 - len(os.fsencode(tmp_path)) and problem.path.startswith("Shop/Deep/ddd")
    assert problem.reason == ("could not be examined (File name too long): the path is longer than the file "
                              "system allows; shorten the folder names above it")
    with open_sftp(sshd, tmp_path) as client:
        listings, _ = list_nas(client)
    assert [f.path for f in listings["Shop/Deep"].files] == ["Shop/Deep/ok.png"]


def test_names_are_logged_on_one_line():
    assert "\n" not in shown("new\nline.png") and shown("new\nline.png") == "'new\\nline.png'"
    assert shown(b"caf\xe9.png") == "'caf\\\\xe9.png'"


def test_a_missing_base_path_is_one_clear_line(tmp_path, sshd):
    with pytest.raises(NasError, match=r"^NAS_BASE_PATH '.*/no/such/base' is not a folder on this machine"):
        LocalNasClient(tmp_path / "no" / "such" / "base")
    with pytest.raises(NasError, match=r"^NAS_BASE_PATH '.*/no/such/base' does not exist on 127.0.0.1:\d+"):
        open_sftp(sshd, tmp_path / "no" / "such" / "base")


def test_unreadable_folders_and_files_are_recorded_not_fatal(migrated_url, tmp_path, sshd):
    """Over SFTP as an ordinary account (root reads everything, so the fixture's key user cannot show it)."""
    if not sshd.password_user:
        pytest.fail("needs the throwaway account the sshd fixture creates as root")
    import shutil
    import tempfile

    from craftflow_migrations.nas import store
    from craftflow_migrations.nas.changes import scan_for_import
    from craftflow_migrations.nas.clients.sftp import SftpNasClient
    from craftflow_migrations.nas.importer import import_batch

    base = Path(tempfile.mkdtemp(prefix="cfm-unreadable-"))
    try:
        folder = base / "Shop" / "T"
        (folder / "locked").mkdir(parents=True)
        (folder / "ok.png").write_bytes(png_bytes(1))
        (folder / "secret.png").write_bytes(png_bytes(2))
        (folder / "locked" / "inside.png").write_bytes(png_bytes(3))
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        engine = get_engine(migrated_url)
        # An earlier import saw the locked folder's file: it must not be marked removed now.
        with engine.begin() as conn:
            store.upsert(conn, [store.row_for(
                __import__("craftflow_migrations.nas.listing", fromlist=["NasFile"]).NasFile(
                    "Shop", "T", "Shop/T/locked/inside.png", 1, 0),
                describe_image(png_bytes(3)), store.EPOCH)])
        os.chmod(folder / "locked", 0o000)
        os.chmod(folder / "secret.png", 0o000)
        client = SftpNasClient("127.0.0.1", sshd.port, sshd.password_user, str(base), password=sshd.password,
                               known_hosts=str(sshd.known_hosts))
        with client, engine.connect() as conn:
            listed_at = store.db_now(conn)
            listings, _ = list_nas(client)
            scans = scan_for_import(listings, engine, listed_at, 2**30)
            result = import_batch(client, engine, scans[0].to_import, listed_at)
        assert any("could not be listed" in p for p in scans[0].problems)
        assert scans[0].removed == 0
        assert result.total.imported == 1 and result.total.failed == 1
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT path, coalesce(error, status::text) FROM design_images")).all())
        assert rows["Shop/T/ok.png"] == "ok"
        assert rows["Shop/T/secret.png"].startswith("could not be read: ")
        assert rows["Shop/T/locked/inside.png"] == "ok"  # kept, not removed
    finally:
        for path in [base, *base.rglob("*")]:
            try:
                os.chmod(path, 0o755)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def test_no_mutation_of_an_image_makes_describe_image_raise():
    """Flipped, truncated and spliced bytes of several formats: always facts, never an exception."""
    rng = random.Random(12)
    sources = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "TGA", "PPM", "DDS"):
        out = io.BytesIO()
        image = noise_image(40, 30, 7, "RGB")
        image.save(out, fmt)
        sources.append(out.getvalue())
    limits = DecodeLimits(max_pixels=50_000_000, timeout_s=2.0)
    for i in range(600):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(min(len(data), 200))  # headers are where parsers trip
            data[pos] = rng.randrange(256)
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        facts = describe_image(bytes(data), limits)
        assert facts.ok or facts.error, i


def test_a_large_print_canvas_still_imports():
    """A 40x60 inch canvas at 300 DPI is 216 M pixels: over Pillow's own bomb limit, under ours."""
    out = io.BytesIO()
    Image.new("1", (12000, 18000)).save(out, "PNG")
    facts = describe_image(out.getvalue())
    assert facts.ok, facts.error
    assert (facts.width, facts.height) == (12000, 18000)


@pytest.mark.parametrize("backend", ["local", "sftp"])
def test_touching_one_file_reimports_exactly_one_row(backend, migrated_url, tmp_path, sshd):
    folder = tmp_path / "G" / "Shop" / "Big"
    folder.mkdir(parents=True)
    data = png_bytes(1, (8, 8))
    for i in range(3000):
        path = folder / f"f{i:05d}.png"
        path.write_bytes(data)
        # Nanosecond mtimes that a float cannot carry exactly.
        os.utime(path, ns=(1_700_000_000_123_456_789 + i * 1_001, 1_700_000_000_123_456_789 + i * 1_001))

    def client():
        return open_sftp(sshd, tmp_path / "G") if backend == "sftp" else None

    first = import_local_folder(migrated_url, tmp_path / "G", client=client())
    assert first["result"].total.imported == 3000
    os.utime(folder / "f01234.png", ns=(1_800_000_000_987_654_321, 1_800_000_000_987_654_321))
    again = import_local_folder(migrated_url, tmp_path / "G", client=client())
    assert again["scans"]["Shop/Big"].unchanged == 2999
    assert again["result"].total.imported == 1
