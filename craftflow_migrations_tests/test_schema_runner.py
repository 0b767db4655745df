"""The migration engine against real PostgreSQL."""

import shutil
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from craftflow_migrations.schema import ledger
from craftflow_migrations.schema.discovery import discover
from craftflow_migrations.schema.helpers import create_index_concurrently, index_state
from craftflow_migrations.schema.runner import ChecksumDrift, MigrationError, downgrade_to, run_pending
from craftflow_migrations.settings import MigrationSettings

from .conftest import PACKAGE_MIGRATIONS

FAST = MigrationSettings(lock_timeout_s=0.2, statement_timeout_s=30, lock_retries=8, runner_lock_wait_s=30)


def copy_migrations(tmp_path: Path) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(PACKAGE_MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    return folder


def single_migration(tmp_path: Path, name: str, source: str) -> Path:
    """A folder holding one migration file, for tests that need nothing else."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / f"{name}.py").write_text(source)
    return folder


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_empty_database_to_head_then_rerun_is_a_noop(engine):
    plan = discover(PACKAGE_MIGRATIONS)
    report = run_pending(engine, plan, "startup", FAST, run_id="run-1")
    assert report.failed == []
    assert report.count("applied") == len(plan.of_kind("startup"))
    assert {"tenants", "users", "shops", "platform_connections", "printers", "canvas_sizes", "designs",
            "design_images", ledger.LEDGER_TABLE} <= tables(engine)
    with engine.connect() as conn:
        rows = ledger.applied(conn)
        assert rows["add_multi_tenant_schema"].checksum == plan.by_name()["add_multi_tenant_schema"].checksum
        assert rows["add_multi_tenant_schema"].dagster_run_id == "run-1"
        assert index_state(conn, "design_images_phash_idx") == "valid"
        shop_columns = {c["name"] for c in inspect(conn).get_columns("shops")}
    assert "access_token" not in shop_columns and "etsy_shop_id" in shop_columns

    again = run_pending(engine, plan, "startup", FAST)
    assert again.count("skipped") == len(plan.of_kind("startup")) and again.count("applied") == 0


def test_only_design_images_linked_to_a_shop_are_indexed_by_shop(engine):
    """The NAS import's rows (no shop) are not in the shop index; lookups by shop and a shop's
    deletion (ON DELETE SET NULL) still find theirs through it. Downgrade restores the full index."""
    plan = discover(PACKAGE_MIGRATIONS)
    assert run_pending(engine, plan, "startup", FAST).failed == []
    with engine.begin() as conn:
        tenant = conn.execute(text("INSERT INTO tenants (name, slug) VALUES ('t', 't') RETURNING id")).scalar()
        shop = conn.execute(text("INSERT INTO shops (tenant_id, name, platform) VALUES (:t, 's', 'etsy') RETURNING id"),
                            {"t": tenant}).scalar()
        conn.execute(text("INSERT INTO design_images (shop, template, path, size_bytes, mtime, shop_id) "
                          "SELECT 'S', 'T', 'S/T/' || i, 1, now(), CASE WHEN i = 1 THEN :s END "
                          "FROM generate_series(1, 500) i"), {"s": shop})
        conn.execute(text("ANALYZE design_images"))
        assert index_state(conn, "design_images_shop_id_idx") is None
        size = conn.execute(text("SELECT pg_relation_size('design_images_linked_shop_id_idx')")).scalar()
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan_text = "\n".join(conn.execute(text("EXPLAIN SELECT id FROM design_images WHERE shop_id = :s"),
                                           {"s": shop}).scalars())
        assert "design_images_linked_shop_id_idx" in plan_text
        conn.execute(text("DELETE FROM shops WHERE id = :s"), {"s": shop})
        assert conn.execute(text("SELECT count(*) FROM design_images WHERE shop_id IS NOT NULL")).scalar() == 0
    assert size <= 2 * 8192  # one linked row: the metapage and one leaf
    downgrade_to(engine, plan, "harden_design_images", FAST)
    with engine.connect() as conn:
        assert index_state(conn, "design_images_shop_id_idx") == "valid"
        assert index_state(conn, "design_images_linked_shop_id_idx") is None


def test_platform_credentials_are_moved_out_of_shops(engine, tmp_path):
    plan = discover(PACKAGE_MIGRATIONS)
    # Stop before the move, add a shop with credentials, then finish.
    before = ["add_multi_tenant_schema", "add_etsy_shop_id"]
    from craftflow_migrations.schema.runner import apply_migration

    for name in before:
        apply_migration(engine, plan.by_name()[name], FAST)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, slug) VALUES (1, 'Acme', 'acme')"))
        conn.execute(text(
            "INSERT INTO shops (tenant_id, name, platform, shopify_domain, access_token, etsy_shop_id) "
            "VALUES (1, 'Acme Prints', 'shopify', 'acme.myshopify.com', 'tok-1', NULL), "
            "       (1, 'Acme Etsy', 'etsy', NULL, 'tok-2', 4242)"
        ))
    assert run_pending(engine, plan, "startup", FAST).failed == []
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT s.name, pc.platform::text, pc.access_token, pc.shopify_domain, pc.external_shop_id "
            "FROM platform_connections pc JOIN shops s ON s.id = pc.shop_id ORDER BY s.name"
        )).all()
    assert [tuple(r) for r in rows] == [
        ("Acme Etsy", "etsy", "tok-2", None, "4242"),
        ("Acme Prints", "shopify", "tok-1", "acme.myshopify.com", None),
    ]


def test_failed_migration_rolls_back_and_skips_only_its_dependents(engine, tmp_path):
    folder = copy_migrations(tmp_path)
    (folder / "zz_bad.py").write_text(
        '"""Creates a table, then fails."""\nfrom sqlalchemy import text\nDEPENDS_ON = ["add_multi_tenant_schema"]\n'
        "def upgrade(connection):\n"
        '    connection.execute(text("CREATE TABLE half_done (id int)"))\n'
        '    connection.execute(text("SELECT * FROM no_such_table"))\n'
    )
    (folder / "zz_after_bad.py").write_text(
        'from sqlalchemy import text\nDEPENDS_ON = ["zz_bad"]\n'
        'def upgrade(connection):\n    connection.execute(text("CREATE TABLE after_bad (id int)"))\n'
    )
    plan = discover(folder)
    report = run_pending(engine, plan, "startup", FAST)
    states = {r.name: r.state for r in report.results}
    assert states["zz_bad"] == "failed" and states["zz_after_bad"] == "blocked"
    assert states["update_phash_hash_size"] == "applied"  # independent ones still ran
    failed = next(r for r in report.results if r.name == "zz_bad")
    assert failed.error.startswith('Migration failed: zz_bad: relation "no_such_table" does not exist')
    assert "half_done" not in tables(engine) and "after_bad" not in tables(engine)
    with engine.connect() as conn:
        assert "zz_bad" not in ledger.applied(conn)


def test_checksum_drift_fails_until_accepted(engine, tmp_path):
    folder = copy_migrations(tmp_path)
    assert run_pending(engine, discover(folder), "startup", FAST).failed == []
    target = folder / "add_etsy_shop_id.py"
    target.write_text(target.read_text() + "\n# edited after it was applied\n")
    plan = discover(folder)
    with pytest.raises(ChecksumDrift, match="Migration add_etsy_shop_id was changed after it was applied.*repair add_etsy_shop_id"):
        run_pending(engine, plan, "startup", FAST)
    with engine.begin() as conn:
        assert ledger.accept_checksum(conn, plan.by_name()["add_etsy_shop_id"])
    assert run_pending(engine, plan, "startup", FAST).failed == []


def test_seed_readme_example_is_picked_up(engine, tmp_path):
    folder = copy_migrations(tmp_path)
    shutil.copy(Path(__file__).parent / "data" / "add_user_preferences.py", folder)
    report = run_pending(engine, discover(folder), "startup", FAST)
    assert report.failed == [] and "user_preferences" in tables(engine)
    assert report.results[-1].name == "add_user_preferences"


def test_non_transactional_migration_rebuilds_an_invalid_index(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE things (id int, code text)"))
        conn.execute(text("INSERT INTO things VALUES (1, 'a'), (2, 'a')"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        with pytest.raises(Exception, match="could not create unique index"):
            create_index_concurrently(conn, "things_code_key", "things", "code", unique=True)
        assert index_state(conn, "things_code_key") == "invalid"
    with engine.begin() as conn:
        conn.execute(text("UPDATE things SET code = 'b' WHERE id = 2"))
    folder = single_migration(
        tmp_path, "unique_things",
        "from craftflow_migrations.schema.helpers import create_index_concurrently\n"
        "DEPENDS_ON = []\nTRANSACTIONAL = False\n"
        "def upgrade(connection):\n"
        "    create_index_concurrently(connection, 'things_code_key', 'things', 'code', unique=True)\n"
    )
    assert run_pending(engine, discover(folder), "startup", FAST).failed == []
    with engine.connect() as conn:
        assert index_state(conn, "things_code_key") == "valid"


def test_lock_timeout_is_retried_instead_of_blocking(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE busy (id int)"))
    folder = single_migration(
        tmp_path, "alter_busy",
        "from sqlalchemy import text\nDEPENDS_ON = []\n"
        "def upgrade(connection):\n    connection.execute(text('ALTER TABLE busy ADD COLUMN note text'))\n"
    )
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(text("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE"))
    threading.Timer(1.0, tx.rollback).start()
    started = time.monotonic()
    report = run_pending(engine, discover(folder), "startup", FAST)
    holder.close()
    assert report.failed == []
    assert report.results[0].attempts > 1
    assert time.monotonic() - started >= 1.0


def test_downgrade_to_a_named_migration(engine):
    plan = discover(PACKAGE_MIGRATIONS)
    assert run_pending(engine, plan, "startup", FAST).failed == []
    undone = downgrade_to(engine, plan, "separate_platform_connections", FAST)
    assert undone == ["update_phash_hash_size", "register_thumbnail_packs",
                      "store_design_thumbnails_in_packs",
                      "store_design_thumbnails_uncompressed", "remove_shopify_unique_constraint"]
    with engine.connect() as conn:
        assert "remove_shopify_unique_constraint" not in ledger.applied(conn)
        cols = {c["name"]: c for c in inspect(conn).get_columns("designs")}
    assert "needs_rehash" not in cols
    assert run_pending(engine, plan, "startup", FAST).count("applied") == 5


def test_downgrade_refuses_without_downgrade_function(engine, tmp_path):
    folder = copy_migrations(tmp_path)
    (folder / "zz_one_way.py").write_text(
        'from sqlalchemy import text\nDEPENDS_ON = ["update_phash_hash_size"]\n'
        'def upgrade(connection):\n    connection.execute(text("CREATE TABLE one_way (id int)"))\n'
    )
    plan = discover(folder)
    assert run_pending(engine, plan, "startup", FAST).failed == []
    with pytest.raises(MigrationError, match="zz_one_way has no downgrade"):
        downgrade_to(engine, plan, "add_multi_tenant_schema", FAST)
    assert "one_way" in tables(engine) and "designs" in tables(engine)  # nothing was undone


def test_downgrade_follows_the_ledger_order(engine, tmp_path):
    """A file added after the others ran sorts early in the files' order but was applied last:
    it is undone first, and undone at all when downgrading to a migration it sorts before."""
    folder = copy_migrations(tmp_path)
    assert run_pending(engine, discover(folder), "startup", FAST).failed == []
    (folder / "aa_late.py").write_text(
        'from sqlalchemy import text\nDEPENDS_ON = ["add_multi_tenant_schema"]\n'
        'def upgrade(connection):\n    connection.execute(text("CREATE TABLE late (id int)"))\n'
        'def downgrade(connection):\n    connection.execute(text("DROP TABLE late"))\n'
    )
    plan = discover(folder)
    names = [m.name for m in plan.migrations]
    assert names.index("aa_late") < names.index("separate_platform_connections")
    assert run_pending(engine, plan, "startup", FAST).count("applied") == 1
    undone = downgrade_to(engine, plan, "separate_platform_connections", FAST)
    assert undone == ["aa_late", "update_phash_hash_size", "register_thumbnail_packs",
                      "store_design_thumbnails_in_packs",
                      "store_design_thumbnails_uncompressed", "remove_shopify_unique_constraint"]
    assert "late" not in tables(engine)
