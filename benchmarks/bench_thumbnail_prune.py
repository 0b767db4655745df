"""What `craftflow-migrate thumbnails --prune` costs: 100,000 small files imported (their own 9 KB
thumbnails in packs), then a share of their images deleted, then the prune, timed per step.

    .venv/bin/python -m benchmarks.bench_thumbnail_prune [--files 100000] [--deleted 0.5]
    .venv/bin/python -m benchmarks.bench_thumbnail_prune --synthetic-rows 1000000

Prints the rows deleted and how long their DELETE held the lock import flushes wait on, the
packs deleted or rewritten with the MB given back, the seconds of each step, and the same
prune again once nothing is left to do. ``--synthetic-rows`` measures only the database's side
at a scale no corpus here reaches: that many image rows and their thumbnails' rows (pointing
into 100 packs that are not written), a share of the images deleted, then the prune's row
delete and its count of each pack's live bytes, timed.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from sqlalchemy import text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--deleted", type=float, default=0.5, help="share of the images deleted before the prune")
    parser.add_argument("--synthetic-rows", type=int, default=0,
                        help="the database's side only, at this many images (no files)")
    args = parser.parse_args()
    if args.synthetic_rows:
        synthetic(args.synthetic_rows, args.deleted)
        return

    from craftflow_migrations.db import get_engine
    from craftflow_migrations.nas import thumbnail_prune
    from craftflow_migrations_tests.support import PostgresServer

    from .bench_nas_import import drop_shape_databases, ensure_small_corpora, fresh_env, nas_only

    one = ensure_small_corpora(args.files, 3_000)[0]
    server = PostgresServer()
    try:
        env = fresh_env(server, one)
        wall, *_ = nas_only(server, env, "import")
        folder = Path(env["DAGSTER_HOME"]) / "thumbnails"
        engine = get_engine(env["DATABASE_URL"])
        every = max(1, round(1 / args.deleted)) if args.deleted > 0 else 0
        with engine.begin() as conn:
            deleted = conn.execute(text("DELETE FROM design_images WHERE id % :n = 0"), {"n": every}).rowcount
            conn.execute(text("ANALYZE design_images"))
        mb = sum(p.stat().st_size for p in folder.rglob("*.pack")) / 2**20
        print(f"\n{args.files:,} small files imported in {wall:.1f} s: {mb:,.0f} MB of packs; "
              f"{deleted:,} of their images deleted")

        timings: dict[str, float] = {}
        delete_rows, prune_packs = thumbnail_prune._delete_unshown_rows, thumbnail_prune._prune_packs

        def timed(name, fn):
            def run(*a, **k):
                started = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    timings[name] = time.perf_counter() - started
            return run

        thumbnail_prune._delete_unshown_rows = timed("rows", delete_rows)
        thumbnail_prune._prune_packs = timed("packs", prune_packs)
        for label in ("prune", "prune again"):
            started = time.perf_counter()
            report = thumbnail_prune.prune_thumbnails(engine, folder, grace_s=0)
            total = time.perf_counter() - started
            print(f"  {label:12} {total:6.2f} s: {report.rows_deleted:,} rows deleted in {timings['rows']:.2f} s "
                  f"(import flushes held back meanwhile); {report.packs_deleted} pack(s) deleted, "
                  f"{report.packs_rewritten} rewritten in {timings['packs']:.2f} s, "
                  f"{report.bytes_freed / 2**20:,.0f} MB given back; problems {len(report.problems)}")
        engine.dispose()
    finally:
        drop_shape_databases(server)
        server.stop()


def synthetic(rows: int, deleted_share: float) -> None:
    from craftflow_migrations.db import get_engine
    from craftflow_migrations.nas import thumbnail_prune
    from craftflow_migrations.schema.discovery import discover
    from craftflow_migrations.schema.runner import run_pending
    from craftflow_migrations.settings import MigrationSettings, migrations_dir
    from craftflow_migrations_tests.support import PostgresServer

    server = PostgresServer()
    url = server.create_database("cfm_prune_rows")
    try:
        engine = get_engine(url)
        assert not run_pending(engine, discover(migrations_dir()), "startup", MigrationSettings()).failed
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO design_images (shop, template, path, size_bytes, mtime, sha256, status)
                SELECT 'Shop', 'T', 'd' || i, 4500, now(), lpad(to_hex(i), 64, '0'), 'ok'
                FROM generate_series(1, :n) i"""), {"n": rows})
            conn.execute(text("""
                INSERT INTO design_thumbnails (sha256, pack, pack_offset, pack_length)
                SELECT lpad(to_hex(i), 64, '0'), '2026-12/' || lpad(to_hex(i % 100), 32, '0') || '.pack',
                       (i / 100) * 9256, 9216
                FROM generate_series(1, :n) i"""), {"n": rows})
            every = max(1, round(1 / deleted_share)) if deleted_share > 0 else 0
            deleted = conn.execute(text("DELETE FROM design_images WHERE id % :n = 0"), {"n": every}).rowcount
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
        print(f"\n{rows:,} image rows and their thumbnails' rows in {time.perf_counter() - started:.1f} s; "
              f"{deleted:,} images deleted")
        for label in ("prune", "prune again"):
            waits: list[float] = []
            stop = threading.Event()
            flushes = threading.Thread(target=_flushes, args=(engine, stop, waits))
            flushes.start()
            started = time.perf_counter()
            try:
                count = thumbnail_prune._delete_unshown_rows(engine, dry_run=False)
            finally:
                stop.set()
                flushes.join()
            rows_s = time.perf_counter() - started
            started = time.perf_counter()
            with engine.connect() as conn:
                live = conn.execute(text(
                    "SELECT pack, sum(pack_length + 40) FROM design_thumbnails WHERE pack IS NOT NULL GROUP BY pack"
                )).all()
            print(f"  {label:12} {count:,} rows deleted in {rows_s:.2f} s; a flush's share of the lock, taken "
                  f"{len(waits):,} times meanwhile, waited at most {1000 * max(waits):.0f} ms "
                  f"(median {1000 * sorted(waits)[len(waits) // 2]:.1f}); "
                  f"live bytes of {len(live)} packs counted in {time.perf_counter() - started:.2f} s")
        engine.dispose()
    finally:
        server.drop_database(url)
        server.stop()


def _flushes(engine, stop: threading.Event, waits: list[float]) -> None:
    """What an import's flushes wait for: the shared lock, taken in a transaction of its own, again and again."""
    from craftflow_migrations.nas import store

    while not stop.is_set():
        started = time.perf_counter()
        with engine.begin() as conn:
            store.lock_thumbnails(conn)
        waits.append(time.perf_counter() - started)
        time.sleep(0.005)


if __name__ == "__main__":
    main()
