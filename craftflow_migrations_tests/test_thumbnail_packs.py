"""Thumbnails in pack files of a folder, indexed in PostgreSQL: written durably before their rows,
read back exactly, never a wrong picture, and a folder that cannot be written is one clear line."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.nas import store, thumbnail_packs
from craftflow_migrations.nas.clients.local import LocalNasClient
from craftflow_migrations.nas.hashing import describe_image
from craftflow_migrations.nas.importer import import_batch
from craftflow_migrations.nas.listing import list_nas
from craftflow_migrations.nas.thumbnail_packs import (
    ALIGN,
    HEADER,
    PackWriter,
    ThumbnailStoreError,
    read_packed,
)
from craftflow_migrations.settings import NasSettings

from .support import write_corpus


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page cache"])
def test_a_pack_reads_back_exactly_and_never_shows_a_wrong_picture(tmp_path, direct):
    folder = tmp_path / "thumbs"
    writer = PackWriter(folder, direct=direct)
    first = {_sha(b"a"): b"\xff\xd8 one", _sha(b"b"): b"", _sha(b"c"): os.urandom(70_000)}
    placed = writer.append_all(first.items())
    placed += writer.append_all([(_sha(b"d"), b"later flush")])  # appended after the first flush
    writer.close()
    assert len({p.pack for p in placed}) == 1 and placed[0].pack.endswith(".pack")
    found, problems = read_packed(folder, placed)
    assert found == {**first, _sha(b"d"): b"later flush"} and problems == []

    # An index entry pointing at another record, past the end, or into a missing pack: left out, said once.
    wrong_place = [placed[0].__class__(placed[0].sha256, placed[0].pack, placed[2].offset, placed[2].length)]
    past_end = [placed[3].__class__(placed[3].sha256, placed[3].pack, placed[3].offset + 10_000, 5)]
    found, problems = read_packed(folder, wrong_place + past_end)
    assert found == {} and len(problems) == 1 and "2 record(s) missing or not the thumbnail indexed" in problems[0]
    # An index row naming anything but a pack of the folder is never opened.
    (tmp_path / "secret").write_bytes(b"x" * 100)
    found, problems = read_packed(folder, [placed[0].__class__(placed[0].sha256, "../secret", 40, 10)])
    assert found == {} and len(problems) == 1 and "'../secret', not a pack of" in problems[0]
    shutil.move(folder, tmp_path / "moved")
    found, problems = read_packed(folder, placed)
    assert found == {} and len(problems) == 1
    assert str(folder / placed[0].pack) in problems[0] and "set CRAFTFLOW_THUMBNAIL_DIR" in problems[0]
    assert read_packed(tmp_path / "moved", placed)[0][_sha(b"d")] == b"later flush"


def _scan(pack: bytes) -> list[tuple[str, bytes]]:
    """Every record of a pack, read as a re-indexing tool would: header after header, and
    where no header's magic is found, the next 4 KB boundary (a direct flush's padding)."""
    records, at = [], 0
    while at + HEADER.size <= len(pack):
        magic, sha, length = HEADER.unpack_from(pack, at)
        if magic != b"CFT1":
            assert pack[at:-(-at // ALIGN) * ALIGN or None].strip(b"\0") == b""
            at = (at // ALIGN + 1) * ALIGN
            continue
        records.append((sha.hex(), pack[at + HEADER.size:at + HEADER.size + length]))
        at += HEADER.size + length
    return records


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page cache"])
def test_records_describe_themselves(tmp_path, direct):
    """A pack holds its own index: each record's header names the sha256 and the length."""
    writer = PackWriter(tmp_path, direct=direct)
    (placed,) = writer.append_all([(_sha(b"x"), b"picture")])
    assert writer.direct == direct  # this file system takes O_DIRECT
    data = (tmp_path / placed.pack).read_bytes()
    magic, sha, length = HEADER.unpack_from(data)
    assert (magic, sha.hex(), length, data[HEADER.size:HEADER.size + length]) == (b"CFT1", _sha(b"x"), 7, b"picture")
    assert len(data) == (ALIGN if direct else HEADER.size + 7) and _scan(data) == [(_sha(b"x"), b"picture")]


def test_direct_flushes_larger_than_the_buffer_and_records_across_it_read_back(tmp_path, monkeypatch):
    """Flushes of many buffers' worth, records crossing the buffer's end and records larger than
    the whole buffer: every one reads back by its index entry and by scanning the pack."""
    monkeypatch.setattr(thumbnail_packs, "DIRECT_BUFFER_BYTES", 2 * ALIGN)
    writer = PackWriter(tmp_path)
    rng = random.Random(7)
    flushes = [[(_sha(f"{f}-{i}".encode()), rng.randbytes(rng.choice([0, 1, 4056, 4057, 8152, 9000, 20_000])))
                for i in range(rng.randint(1, 12))] for f in range(8)]
    placed = [p for flush in flushes for p in writer.append_all(flush)]
    writer.close()
    expected = dict(item for flush in flushes for item in flush)
    assert read_packed(tmp_path, placed) == (expected, [])
    pack = (tmp_path / placed[0].pack).read_bytes()
    assert len(pack) % ALIGN == 0 and _scan(pack) == [item for flush in flushes for item in flush]


def test_a_device_that_refuses_the_direct_writes_gets_them_through_the_page_cache(tmp_path, monkeypatch):
    """Blocks larger than ALIGN (here: ALIGN made smaller than the disk's): the kernel refuses
    the first direct write, and the same flush and every later one go through the page cache."""
    monkeypatch.setattr(thumbnail_packs, "ALIGN", 100)
    writer = PackWriter(tmp_path)
    placed = writer.append_all([(_sha(b"a"), b"first"), (_sha(b"b"), os.urandom(5000))])
    assert not writer.direct
    placed += writer.append_all([(_sha(b"c"), b"second flush")])
    writer.close()
    found, problems = read_packed(tmp_path, placed)
    assert problems == [] and found[_sha(b"a")] == b"first" and found[_sha(b"c")] == b"second flush"
    assert (tmp_path / placed[0].pack).stat().st_size == 3 * HEADER.size + 5 + 5000 + 12


def _import(url: str, base, settings: NasSettings):
    files = sorted((f for li in list_nas(LocalNasClient(base))[0].values() for f in li.files), key=lambda f: f.path)
    import_batch(LocalNasClient(base), get_engine(url), files, datetime.now(timezone.utc), settings,
                 had_rows=frozenset())
    return files


@pytest.mark.parametrize("where", ["folder", "postgres"])
def test_an_import_stores_each_thumbnail_once_and_reads_it_back_exactly(migrated_url, tmp_path, where):
    base = tmp_path / "nas"
    paths = write_corpus(base, {("Shop", "T"): 6}, size=(500, 300))
    shutil.copy(paths[0], base / "Shop" / "T" / "same bytes again.png")  # content-addressed: one thumbnail
    folder = tmp_path / "thumbs"
    _import(migrated_url, base, NasSettings(thumbnail_store=where, thumbnail_dir=str(folder)))
    expected = {}
    for path in sorted((base / "Shop" / "T").iterdir()):
        facts = describe_image(path.read_bytes())
        expected[facts.sha256] = facts.thumbnail
    with get_engine(migrated_url).connect() as conn:
        rows = conn.execute(text("SELECT sha256, jpeg IS NULL AS packed, pack FROM design_thumbnails")).all()
        assert len(rows) == len(expected) == 6
        assert all(r.packed == (where == "folder") and (r.pack is not None) == (where == "folder") for r in rows)
        assert store.thumbnails(conn, list(expected) + ["0" * 64], folder) == expected
    packs = list(folder.rglob("*.pack")) if folder.exists() else []
    assert len(packs) == (1 if where == "folder" else 0)


def test_a_thumbnail_folder_that_cannot_be_written_fails_the_batch_in_one_line_and_writes_no_row(
        migrated_url, tmp_path):
    base = tmp_path / "nas"
    write_corpus(base, {("Shop", "T"): 2}, size=(200, 100))
    in_the_way = tmp_path / "a file"
    in_the_way.write_bytes(b"")
    with pytest.raises(ThumbnailStoreError) as raised:
        _import(migrated_url, base, NasSettings(thumbnail_dir=str(in_the_way / "thumbs")))
    message = str(raised.value)
    assert "\n" not in message and str(in_the_way / "thumbs") in message and "CRAFTFLOW_THUMBNAIL_DIR" in message
    with get_engine(migrated_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM design_images")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM design_thumbnails")).scalar() == 0


def test_the_thumbnails_command_finds_every_picture_after_the_folder_moves(migrated_url, dagster_home, tmp_path):
    """An operator moves the packs, runs `craftflow-migrate thumbnails`: it says what is missing and what to set."""
    import subprocess
    import sys

    from .conftest import cli_env
    from .support import import_local_folder

    base = tmp_path / "nas"
    write_corpus(base, {("Shop", "T"): 4}, size=(300, 200))
    import_local_folder(migrated_url, base)  # thumbnails in packs under DAGSTER_HOME/thumbnails
    cli = [sys.executable, "-m", "craftflow_migrations.cli", "thumbnails"]
    ok = subprocess.run(cli, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"0 in PostgreSQL, 4 in 1 pack(s) under {dagster_home / 'thumbnails'}" in ok.stdout

    shutil.move(dagster_home / "thumbnails", tmp_path / "elsewhere")
    missing = subprocess.run(cli, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "❌ 4 thumbnail(s) could not be read back: if the folder moved, set CRAFTFLOW_THUMBNAIL_DIR" in missing.stdout
    moved = subprocess.run(cli, env=cli_env(CRAFTFLOW_THUMBNAIL_DIR=str(tmp_path / "elsewhere")),
                           capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0 and f"4 in 1 pack(s) under {tmp_path / 'elsewhere'}" in moved.stdout


def test_a_full_disk_mid_import_fails_in_one_line_and_the_rerun_completes(migrated_url, tmp_path):
    """The pack folder on a real 256 KB file system fills up mid-import: the batch fails with one
    line, every committed row still shows its picture, and once there is room the re-run
    imports the rest, each file once."""
    import subprocess

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        from .support import import_local_folder

        base = tmp_path / "nas"
        write_corpus(base, {("Shop", "T"): 40}, size=(640, 480))  # noise: 20-30 KB thumbnails
        settings = NasSettings(thumbnail_dir=str(tiny / "thumbs"), commit_every=4)
        with pytest.raises(ThumbnailStoreError) as raised:
            import_local_folder(migrated_url, base, settings=settings)
        message = str(raised.value)
        assert "\n" not in message and "No space left on device" in message and str(tiny / "thumbs") in message
        engine = get_engine(migrated_url)

        def rows_and_pictures() -> tuple[int, int]:
            with engine.connect() as conn:
                shas = conn.execute(text("SELECT sha256 FROM design_images WHERE status = 'ok'")).scalars().all()
                return len(shas), len(store.thumbnails(conn, shas, tiny / "thumbs"))

        committed, shown = rows_and_pictures()
        assert 0 < committed < 40 and shown == committed
        subprocess.run(["mount", "-o", "remount,size=16m", str(tiny)], check=True)
        import_local_folder(migrated_url, base, settings=settings)
        assert rows_and_pictures() == (40, 40)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(DISTINCT path) FROM design_images")).scalar() == 40
    finally:
        subprocess.run(["umount", "-l", str(tiny)], capture_output=True)
