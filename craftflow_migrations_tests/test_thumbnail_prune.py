"""Pruning thumbnails no image shows: their rows, then packs deleted or rewritten; every picture
still shown reads back exactly, and a flush about to commit an image with a stored picture
is never left pointing at nothing."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.nas import store, thumbnail_prune
from craftflow_migrations.nas.clients.local import LocalNasClient
from craftflow_migrations.nas.hashing import describe_image
from craftflow_migrations.nas.importer import import_batch
from craftflow_migrations.nas.listing import list_nas
from craftflow_migrations.nas.thumbnail_packs import HEADER
from craftflow_migrations.nas.thumbnail_prune import PruneBusy, prune_thumbnails
from craftflow_migrations.settings import NasSettings

from .support import write_corpus


def _import(url: str, base, settings: NasSettings) -> None:
    files = sorted((f for li in list_nas(LocalNasClient(base))[0].values() for f in li.files), key=lambda f: f.path)
    import_batch(LocalNasClient(base), get_engine(url), files, datetime.now(timezone.utc), settings,
                 had_rows=frozenset())


def _import_then_drop_gone(url: str, tmp_path, counts: dict, size: tuple[int, int]):
    """``counts`` imported into one pack folder, then the shop 'Gone''s rows deleted: its
    thumbnails are no longer shown. The engine and the pack folder."""
    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    write_corpus(base, counts, size=size)
    _import(url, base, NasSettings(thumbnail_dir=str(folder)))
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM design_images WHERE shop = 'Gone'"))
    return engine, folder


def _shown(engine, folder) -> dict[str, bytes]:
    with engine.connect() as conn:
        shas = conn.execute(text("SELECT DISTINCT sha256 FROM design_images WHERE status = 'ok'")).scalars().all()
        return store.thumbnails(conn, shas, folder)


def _pack_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.pack"))


def test_prune_deletes_unshown_rows_and_rewrites_or_deletes_their_packs(migrated_url, tmp_path, monkeypatch):
    monkeypatch.setattr(thumbnail_prune, "REWRITE_CHUNK", 1)  # a rewrite of several chunks
    monkeypatch.setattr(thumbnail_prune, "DELETE_CHUNK", 4)  # rows deleted under several holds of the lock
    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    settings = NasSettings(thumbnail_dir=str(folder))
    kept = write_corpus(base / "a", {("Kept", "T"): 3, ("Gone", "T"): 9}, size=(300, 200))
    _import(migrated_url, base / "a", settings)  # one pack: 3 live records, 9 to go
    write_corpus(base / "b", {("Gone too", "T"): 4}, size=(300, 200), seed=100)
    _import(migrated_url, base / "b", settings)  # a second pack, all of it to go
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM design_images WHERE shop IN ('Gone', 'Gone too')"))
        conn.execute(text("UPDATE design_images SET status = 'removed' WHERE path LIKE '%design 002%'"))
    expected = {describe_image(p.read_bytes()).sha256: describe_image(p.read_bytes()).thumbnail
                for p in kept if p.parent.parent.name == "Kept" and "design 002" not in p.name}
    before = _pack_bytes(folder)

    first = prune_thumbnails(engine, folder)  # a day's grace by default: rows go, packs stay
    assert (first.rows_deleted, first.packs_recent, first.packs_deleted, first.packs_rewritten) == (14, 2, 0, 0)
    dry = prune_thumbnails(engine, folder, grace_s=0, dry_run=True)
    assert (dry.rows_deleted, dry.packs_deleted, dry.packs_rewritten) == (0, 1, 1)  # the rows went just before
    assert _pack_bytes(folder) == before

    report = prune_thumbnails(engine, folder, grace_s=0)
    assert (report.packs_deleted, report.packs_rewritten, report.problems) == (1, 1, [])
    assert report.bytes_freed == before - _pack_bytes(folder) > 0
    assert len(list(folder.rglob("*.pack"))) == 1
    assert _shown(engine, folder) == expected  # every picture still shown, byte for byte
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM design_thumbnails")).scalar() == len(expected)
        assert store.check_thumbnails(conn, folder).unreadable == 0

    again = prune_thumbnails(engine, folder, grace_s=0)
    assert (again.rows_deleted, again.packs_deleted, again.packs_rewritten) == (0, 0, 0)


def test_the_first_prune_counts_rows_it_would_delete(migrated_url, tmp_path):
    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    write_corpus(base, {("Gone", "T"): 2}, size=(120, 80))
    _import(migrated_url, base, NasSettings(thumbnail_dir=str(folder)))
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM design_images"))
    dry = prune_thumbnails(engine, folder, grace_s=0, dry_run=True)
    assert (dry.rows_deleted, dry.packs_deleted) == (2, 1) and len(list(folder.rglob("*.pack"))) == 1
    report = prune_thumbnails(engine, folder, grace_s=0)
    assert (report.rows_deleted, report.packs_deleted) == (2, 1) and list(folder.rglob("*.pack")) == []


def test_a_pack_that_does_not_read_back_is_left_and_said(migrated_url, tmp_path, monkeypatch):
    """Its last live record does not read back: the copy made of the records before is deleted
    again, and the pack stays as it was."""
    monkeypatch.setattr(thumbnail_prune, "REWRITE_CHUNK", 1)
    engine, folder = _import_then_drop_gone(migrated_url, tmp_path, {("Kept", "T"): 2, ("Gone", "T"): 8}, (300, 200))
    with engine.begin() as conn:
        offset = conn.execute(text("SELECT max(pack_offset) FROM design_thumbnails t JOIN design_images d "
                                   "USING (sha256) WHERE d.shop = 'Kept'")).scalar_one()
    (pack,) = folder.rglob("*.pack")
    with open(pack, "r+b") as fh:  # the kept record's header overwritten
        fh.seek(offset - HEADER.size)
        fh.write(b"XXXX")
    size = pack.stat().st_size
    report = prune_thumbnails(engine, folder, grace_s=0)
    assert report.packs_rewritten == 0 and pack.stat().st_size == size and list(folder.rglob("*.pack")) == [pack]
    assert any(str(pack) in line and "left as it is" in line for line in report.problems)


def test_a_flush_about_to_commit_an_image_keeps_its_stored_picture(migrated_url, tmp_path):
    """An import found the picture stored and has not committed its image row yet: the prune
    waits for the flush's share of the lock, then sees the image and keeps the picture."""
    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    (path,) = write_corpus(base, {("Shop", "T"): 1}, size=(200, 100))
    settings = NasSettings(thumbnail_dir=str(folder))
    _import(migrated_url, base, settings)
    engine = get_engine(migrated_url)
    facts = describe_image(path.read_bytes())
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM design_images"))  # the picture is unshown now
    (f,) = [f for li in list_nas(LocalNasClient(base))[0].values() for f in li.files]

    flush = engine.connect()
    flush.begin()
    store.save_thumbnails(flush, {facts.sha256: facts.thumbnail})  # found stored: nothing written
    store.upsert(flush, [], fresh=[store.row_for(f, facts, datetime.now(timezone.utc))])
    outcome = []
    pruning = threading.Thread(target=lambda: outcome.append(prune_thumbnails(engine, folder, grace_s=0)))
    pruning.start()
    pruning.join(1.0)
    assert pruning.is_alive(), "the prune must wait for the flush"
    flush.commit()
    flush.close()
    pruning.join(30)
    assert outcome[0].rows_deleted == 0
    assert _shown(engine, folder) == {facts.sha256: facts.thumbnail}


def test_one_prune_at_a_time_and_recent_packs_are_left(migrated_url, tmp_path):
    folder = tmp_path / "thumbs"
    (folder / "2026-12").mkdir(parents=True)
    orphan = folder / "2026-12" / ("0" * 32 + ".pack")
    engine = get_engine(migrated_url)
    store.register_pack(engine, "2026-12/" + "0" * 32 + ".pack")
    orphan.write_bytes(b"\0" * 4096)  # a step's pack before its first commit: no row yet
    assert prune_thumbnails(engine, folder).packs_recent == 1 and orphan.exists()
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": 0x43465450_52554E45})
        with pytest.raises(PruneBusy, match="another `craftflow-migrate thumbnails --prune` is running"):
            prune_thumbnails(engine, folder, grace_s=0)
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": 0x43465450_52554E45})
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert prune_thumbnails(engine, folder, grace_s=600).packs_deleted == 1 and not orphan.exists()
    with engine.connect() as conn:
        assert store.packs_written_here(conn) == set()  # its registration went with it


def test_the_thumbnails_command_prunes(migrated_url, dagster_home, tmp_path):
    import subprocess
    import sys

    from .conftest import cli_env
    from .support import import_local_folder

    base = tmp_path / "nas"
    write_corpus(base, {("Kept", "T"): 1, ("Gone", "T"): 6}, size=(300, 200))
    import_local_folder(migrated_url, base)  # packs under DAGSTER_HOME/thumbnails
    with get_engine(migrated_url).begin() as conn:
        conn.execute(text("DELETE FROM design_images WHERE shop = 'Gone'"))
    cli = [sys.executable, "-m", "craftflow_migrations.cli", "thumbnails", "--prune", "--grace-hours", "0"]
    dry = subprocess.run([*cli, "--dry-run"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "Would prune: 6 thumbnail row(s) no image shows; 0 pack(s) deleted, 1 rewritten" in dry.stdout
    done = subprocess.run(cli, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pruned: 6 thumbnail row(s) no image shows; 0 pack(s) deleted, 1 rewritten" in done.stdout
    assert "0 in PostgreSQL, 1 in 1 pack(s)" in done.stdout


def test_packs_of_another_database_sharing_the_folder_are_left_alone(migrated_url, postgres_server, tmp_path):
    """Staging and production given one thumbnail folder, then a restored copy of production
    beside it: each prune deletes only packs its own database wrote, though no row of its own
    points at the others'."""
    from .conftest import _dispose, migrate

    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    settings = NasSettings(thumbnail_dir=str(folder))
    write_corpus(base / "staging", {("Staging", "T"): 3}, size=(200, 100))
    write_corpus(base / "production", {("Production", "T"): 4}, size=(200, 100), seed=50)
    staging = get_engine(migrated_url)
    _import(migrated_url, base / "staging", settings)
    production_url = postgres_server.create_database()
    copy_url = None
    try:
        production = get_engine(migrate(production_url))
        _import(production_url, base / "production", settings)
        shown_in_production = _shown(production, folder)
        assert len(shown_in_production) == 4 and len(list(folder.rglob("*.pack"))) == 2

        with staging.begin() as conn:
            conn.execute(text("DELETE FROM design_images"))
        report = prune_thumbnails(staging, folder, grace_s=0)
        assert (report.rows_deleted, report.packs_deleted, report.packs_not_ours) == (3, 1, 1)
        assert "1 pack(s)" in report.line() and "not registered by this database left alone" in report.line()
        assert _shown(production, folder) == shown_in_production

        # A restored copy of production (its rows name production as the packs' writer).
        _dispose(production_url)
        copy_url = postgres_server.create_database(template=production_url)
        copy = get_engine(copy_url)
        with copy.begin() as conn:
            conn.execute(text("DELETE FROM design_images"))
        copied = prune_thumbnails(copy, folder, grace_s=0)
        assert (copied.rows_deleted, copied.packs_deleted, copied.packs_rewritten, copied.packs_not_ours) == (4, 0, 0, 1)
        assert _shown(get_engine(production_url), folder) == shown_in_production
    finally:
        for url in (production_url, copy_url):
            if url:
                _dispose(url)
                postgres_server.drop_database(url)


def test_the_migration_registers_the_packs_rows_point_at(migrated_url, tmp_path):
    """Packs written before registration: those rows point at are this database's; a pack no row
    points at could be anyone's, and stays unregistered (never deleted by the prune)."""
    from craftflow_migrations.migrations import register_thumbnail_packs

    base, folder = tmp_path / "nas", tmp_path / "thumbs"
    write_corpus(base, {("Shop", "T"): 2}, size=(120, 80))
    _import(migrated_url, base, NasSettings(thumbnail_dir=str(folder)))
    (pack,) = folder.rglob("*.pack")
    stray = pack.parent / ("f" * 32 + ".pack")
    stray.write_bytes(b"\0" * 4096)
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        register_thumbnail_packs.downgrade(conn)
        register_thumbnail_packs.upgrade(conn)
    with engine.connect() as conn:
        assert store.packs_written_here(conn) == {pack.relative_to(folder).as_posix()}
    report = prune_thumbnails(engine, folder, grace_s=0)
    assert (report.packs_deleted, report.packs_not_ours) == (0, 1) and stray.exists() and pack.exists()


def test_the_weekly_schedule_runs_the_prune_as_a_dagster_job(migrated_url, instance, tmp_path, monkeypatch):
    """The schedule is on by default and asks for the job; the job prunes and says what it did in
    its output's metadata; while a prune started by hand runs, the scheduled one steps aside."""
    import dagster as dg

    from craftflow_migrations.definitions import defs

    engine, folder = _import_then_drop_gone(migrated_url, tmp_path, {("Kept", "T"): 1, ("Gone", "T"): 3}, (120, 80))
    monkeypatch.setenv("CRAFTFLOW_THUMBNAIL_DIR", str(folder))

    schedule = defs.get_schedule_def("thumbnail_prune_weekly")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    (request,) = schedule.evaluate_tick(dg.build_schedule_context(instance)).run_requests
    job = defs.resolve_job_def(schedule.job_name)
    config = {"ops": {"prune_unshown_thumbnails": {"config": {"grace_hours": 0}}}}
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": thumbnail_prune.PRUNE_LOCK_KEY})
        busy = job.execute_in_process(instance=instance, run_config=config, tags=request.tags)
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": thumbnail_prune.PRUNE_LOCK_KEY})
    assert busy.success and "skipped" in _output_metadata(busy)
    result = job.execute_in_process(instance=instance, run_config=config, tags=request.tags)
    assert result.success
    meta = _output_metadata(result)
    assert (meta["rows_deleted"], meta["packs_rewritten"], meta["packs_not_ours"]) == (3, 1, 0)
    assert len(_shown(engine, folder)) == 1


def _output_metadata(result) -> dict:
    (event,) = [e for e in result.all_events if e.is_successful_output]
    return {k: v.value for k, v in event.step_output_data.metadata.items()}
