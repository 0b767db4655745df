"""plan, risk rules, baseline and batched_update against real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time

from sqlalchemy import inspect, text

from craftflow_migrations.schema import ledger
from craftflow_migrations.schema.baseline import baseline
from craftflow_migrations.schema.batched import batched_update
from craftflow_migrations.schema.discovery import discover
from craftflow_migrations.schema.plan import dry_run
from craftflow_migrations.schema.rules import check_statements
from craftflow_migrations.schema.runner import apply_migration, run_pending

from .conftest import PACKAGE_MIGRATIONS, cli_env
from .test_schema_runner import FAST, copy_migrations

CLI = [sys.executable, "-m", "craftflow_migrations.cli"]


def test_plan_dry_runs_every_pending_migration_and_commits_nothing(engine):
    reports = {r.name: r for r in dry_run(engine, discover(PACKAGE_MIGRATIONS), "startup", FAST)}
    assert reports["add_design_images_phash_index"].state == "not-dry-runnable"
    tenants = reports["add_multi_tenant_schema"]
    assert tenants.state == "dry-run" and any(s.startswith("CREATE TABLE IF NOT EXISTS tenants") for s in tenants.statements)
    assert {lk.table for lk in tenants.locks} >= {"public.tenants", "public.users", "public.shops"}
    # Later migrations saw the earlier ones' tables (one transaction, a savepoint each).
    assert reports["separate_platform_connections"].state == "dry-run"
    assert inspect(engine).get_table_names() == []  # everything was rolled back
    with engine.connect() as conn:
        assert not ledger.ledger_exists(conn)


def test_plan_reports_locks_and_risks_on_tables_with_rows(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id int, shop_id int, total numeric)"))
        conn.execute(text("INSERT INTO orders SELECT i, i, i FROM generate_series(1, 100) i"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a_risky.py").write_text(
        "from sqlalchemy import text\nDEPENDS_ON = []\n"
        "def upgrade(connection):\n"
        "    connection.execute(text('CREATE INDEX orders_shop_idx ON orders (shop_id)'))\n"
        "    connection.execute(text('ALTER TABLE orders ADD COLUMN status text NOT NULL'))\n"
    )
    [report] = dry_run(engine, discover(folder), "startup", FAST)
    assert report.state == "failed"  # the NOT NULL column fails on existing rows, in the dry run already
    (folder / "a_risky.py").write_text(
        "from sqlalchemy import text\nDEPENDS_ON = []\n"
        "def upgrade(connection):\n"
        "    connection.execute(text('CREATE INDEX orders_shop_idx ON orders (shop_id)'))\n"
        "    connection.execute(text('ALTER TABLE orders ALTER COLUMN total TYPE bigint'))\n"
    )
    [report] = dry_run(engine, discover(folder), "startup", FAST)
    assert report.state == "dry-run"
    assert [lk.mode for lk in report.locks if lk.table == "public.orders" and lk.stands_out] == ["AccessExclusiveLock"]
    assert {f.rule for f in report.unacknowledged} == {"index-without-concurrently", "column-type-change"}
    assert "CREATE INDEX CONCURRENTLY" in report.findings[0].message
    with engine.connect() as conn:  # nothing committed
        assert conn.execute(text("SELECT data_type FROM information_schema.columns WHERE table_name = 'orders' "
                                 "AND column_name = 'total'")).scalar() == "numeric"

    env = cli_env(CRAFTFLOW_MIGRATIONS_DIR=str(folder))
    risky = subprocess.run([*CLI, "plan"], env=env, capture_output=True, text=True, timeout=120)
    assert risky.returncode == 1, risky.stdout + risky.stderr
    assert "LOCK  public.orders: AccessExclusiveLock (has rows)  <- ACCESS EXCLUSIVE on a table with rows" \
        in risky.stdout
    assert "RISK  [index-without-concurrently]" in risky.stdout
    (folder / "a_risky.py").write_text(
        (folder / "a_risky.py").read_text().replace(
            "DEPENDS_ON = []", 'DEPENDS_ON = []\nACKNOWLEDGE = {"index-without-concurrently": "100 rows", '
                               '"column-type-change": "a tiny table, locked for milliseconds"}'))
    accepted = subprocess.run([*CLI, "plan"], env=env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "ok    [column-type-change]" in accepted.stdout and "(acknowledged: a tiny table" in accepted.stdout


def test_risk_rules_and_their_safe_alternatives():
    rows = {"shops", "orders"}
    found = {f.rule: f.message for f in check_statements([
        "CREATE UNIQUE INDEX shops_x ON shops (name)",
        "CREATE INDEX CONCURRENTLY shops_y ON shops (name)",
        "CREATE INDEX empty_idx ON empty_table (x)",
        "ALTER TABLE orders ADD COLUMN paid boolean NOT NULL",
        "ALTER TABLE orders ADD COLUMN fee int NOT NULL DEFAULT 0",
        "ALTER TABLE orders ADD CONSTRAINT orders_shop_fk FOREIGN KEY (shop_id) REFERENCES shops (id)",
        "ALTER TABLE orders ADD CONSTRAINT orders_shop_fk2 FOREIGN KEY (shop_id) REFERENCES shops (id) NOT VALID",
        "SET LOCAL lock_timeout = 0",
    ], rows)}
    assert set(found) == {"index-without-concurrently", "not-null-without-default", "foreign-key-not-valid",
                          "lock-timeout-disabled"}
    assert "NOT VALID, then VALIDATE CONSTRAINT" in found["foreign-key-not-valid"]
    assert "backfill in batches, then SET NOT NULL" in found["not-null-without-default"]


def test_real_run_records_statements_locks_and_findings_on_the_op(migrated_url, instance):
    from craftflow_migrations.db import get_engine
    from craftflow_migrations.definitions import startup_job_factory

    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {ledger.LEDGER_TABLE} WHERE name = 'add_etsy_shop_id'"))
    result = startup_job_factory().execute_in_process(instance=instance)
    assert result.success
    [output] = [e for e in result.all_events if e.is_successful_output and e.step_key == "add_etsy_shop_id"]
    metadata = output.step_output_data.metadata
    assert "ALTER TABLE shops ADD COLUMN IF NOT EXISTS etsy_shop_id bigint" in metadata["statements"].value
    assert "public.shops: AccessExclusiveLock" in metadata["locks"].value


def test_baseline_adopts_a_database_without_a_ledger(engine, tmp_path, instance, monkeypatch):
    plan = discover(PACKAGE_MIGRATIONS)
    assert run_pending(engine, plan, "startup", FAST).failed == []
    with engine.begin() as conn:  # the old service's state: the schema, no ledger
        conn.execute(text(f"DROP TABLE {ledger.LEDGER_TABLE}"))
    results = {r.name: r for r in baseline(engine, plan, FAST)}
    assert {r.state for r in results.values()} == {"recorded"}
    assert results["add_multi_tenant_schema"].checked >= 3
    again = run_pending(engine, plan, "startup", FAST)
    assert again.count("skipped") == len(plan.of_kind("startup")) and again.count("applied") == 0
    with engine.connect() as conn:
        rows = ledger.applied(conn)
    assert all(rows[m.name].checksum == m.checksum for m in plan.of_kind("startup"))


def test_baseline_reports_what_does_not_match(engine, tmp_path):
    folder = copy_migrations(tmp_path)
    plan = discover(folder)
    names = [m.name for m in plan.of_kind("startup")]
    for name in names[: names.index("add_etsy_shop_id") + 1]:  # the old service got this far
        apply_migration(engine, plan.by_name()[name], FAST)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {ledger.LEDGER_TABLE}"))
        conn.execute(text("DROP INDEX shops_etsy_shop_id_key"))
    results = {r.name: r for r in baseline(engine, plan, FAST, to="add_etsy_shop_id")}
    assert results["add_etsy_shop_id"].state == "mismatch"
    assert results["add_etsy_shop_id"].missing == ["index shops.shops_etsy_shop_id_key"]
    assert results["add_multi_tenant_schema"].state == "recorded"
    with engine.connect() as conn:
        assert set(ledger.applied(conn)) == {n for n, r in results.items() if r.state == "recorded"}


def test_batched_update_reaches_rows_that_offset_paging_skips(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE people (id bigint PRIMARY KEY, first text, last text, display text)"))
        conn.execute(text("INSERT INTO people SELECT i, 'A' || i, 'B' || i, NULL FROM generate_series(1, 1000) i"))
    # The old README's recipe: OFFSET paging over rows the update removes from its own filter.
    with engine.begin() as conn:
        offset = 0
        while True:
            ids = conn.execute(text("SELECT id FROM people WHERE display IS NULL ORDER BY id LIMIT 100 OFFSET :o"),
                               {"o": offset}).scalars().all()
            if not ids:
                break
            conn.execute(text("UPDATE people SET display = 'x' WHERE id = ANY(:ids)"), {"ids": ids})
            offset += 100
        skipped = conn.execute(text("SELECT count(*) FROM people WHERE display IS NULL")).scalar()
        conn.execute(text("UPDATE people SET display = NULL"))
    assert skipped == 500  # half the rows were never touched

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        started = time.monotonic()
        result = batched_update(conn, name="people_display", table="people", todo="t.display IS NULL",
                                set_="display = t.first || ' ' || t.last", batch_size=100, duty_cycle=0.5)
        took = time.monotonic() - started
        assert conn.execute(text("SELECT count(*) FROM people WHERE display IS NULL")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM craftflow_migration_checkpoints")).scalar() == 0
    assert (result.rows_seen, result.batches) == (1000, 10)
    assert took >= result.seconds * 0.4  # the throttle slept about as long as the batches ran


def test_a_non_transactional_migration_that_disables_lock_timeout_is_reported(engine, tmp_path):
    from .test_schema_runner import single_migration

    folder = single_migration(
        tmp_path, "no_timeout",
        "from sqlalchemy import text\nDEPENDS_ON = []\nTRANSACTIONAL = False\n"
        "def upgrade(connection):\n"
        "    connection.execute(text('SET lock_timeout = 0'))\n"
        "    connection.execute(text('CREATE TABLE IF NOT EXISTS t (id int)'))\n"
    )
    [result] = run_pending(engine, discover(folder), "startup", FAST).results
    assert result.state == "applied"
    assert [f.split("]")[0] for f in result.findings] == ["[lock-timeout-disabled"]
