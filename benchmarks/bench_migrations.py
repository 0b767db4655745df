"""Time to apply every startup migration to an empty database, and of a no-op re-run.

Each is measured twice in the same run, side by side: the plain engine (database work
only) and the Dagster startup job (execute_job on a real instance); the difference is
Dagster's overhead.

    .venv/bin/python -m benchmarks.bench_migrations [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from craftflow_migrations.db import get_engine
from craftflow_migrations.instance import LOCAL_DAGSTER_YAML
from craftflow_migrations.schema.discovery import discover
from craftflow_migrations.schema.runner import run_pending
from craftflow_migrations.settings import MigrationSettings, migrations_dir
from craftflow_migrations_tests.support import PostgresServer


def plain(url: str) -> float:
    started = time.perf_counter()
    report = run_pending(get_engine(url), discover(migrations_dir()), "startup", MigrationSettings())
    assert not report.failed
    return time.perf_counter() - started


def with_dagster(url: str, instance: dg.DagsterInstance) -> float:
    from craftflow_migrations.definitions import startup_job_factory

    os.environ["DATABASE_URL"] = url
    started = time.perf_counter()
    with dg.execute_job(dg.reconstructable(startup_job_factory), instance) as result:
        assert result.success
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server = PostgresServer()
    rows = {"empty -> head": ([], []), "no-op re-run": ([], [])}
    with tempfile.TemporaryDirectory() as home:
        Path(home, "dagster.yaml").write_text(LOCAL_DAGSTER_YAML)
        os.environ["DAGSTER_HOME"] = home
        with dg.DagsterInstance.get() as instance:
            for _ in range(args.repeat):
                for runner in ("plain", "dagster"):
                    url = server.create_database("cfm_bench")
                    try:
                        first = plain(url) if runner == "plain" else with_dagster(url, instance)
                        again = plain(url) if runner == "plain" else with_dagster(url, instance)
                    finally:
                        get_engine(url).dispose()
                        server.drop_database(url)
                    index = 0 if runner == "plain" else 1
                    rows["empty -> head"][index].append(first)
                    rows["no-op re-run"][index].append(again)
    count = len(discover(migrations_dir()).of_kind("startup"))
    print(f"{count} startup migrations, median of {args.repeat} runs, PostgreSQL at {server.admin_url.split('@')[-1]}")
    print(f"{'':16} {'database work':>14} {'Dagster job':>12} {'Dagster overhead':>17} {'job / db':>9}")
    for label, (db, job) in rows.items():
        d, j = statistics.median(db), statistics.median(job)
        print(f"{label:16} {d:13.3f}s {j:11.3f}s {j - d:16.3f}s {j / d:8.1f}x")
    server.stop()


if __name__ == "__main__":
    main()
