"""What `craftflow-migrate thumbnails --prune` costs: 100,000 small files imported (their own 9 KB
thumbnails in packs), then a share of their images deleted, then the prune, timed per step.

    .venv/bin/python -m benchmarks.bench_thumbnail_prune [--files 100000] [--deleted 0.5]

Prints the rows deleted and how long their DELETE held the lock import flushes wait on, the
packs deleted or rewritten with the MB given back, the seconds of each step, and the same
prune again once nothing is left to do.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sqlalchemy import text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--deleted", type=float, default=0.5, help="share of the images deleted before the prune")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
