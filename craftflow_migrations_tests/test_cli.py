"""craftflow-migrate as operators run it: subprocesses with the service's environment."""

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.schema.discovery import discover

from .conftest import PACKAGE_MIGRATIONS, cli_env

CLI = [sys.executable, "-m", "craftflow_migrations.cli"]


def run_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_startup_mode_applies_then_is_a_noop(database_url, dagster_home):
    env = cli_env(MIGRATION_MODE="startup")
    first = run_cli(env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Startup migrations: ok" in first.stdout and "add_multi_tenant_schema" in first.stdout
    second = run_cli(env=env)
    assert second.returncode == 0
    assert "applied: nothing (already at head)" in second.stdout
    status = run_cli("status", env=env)
    assert status.returncode == 0
    assert "run_canvas_size_migration" in status.stdout and "pending" in status.stdout
    # the runs are recorded in the instance at DAGSTER_HOME, so they appear in the UI
    assert any((dagster_home / "history").iterdir())


def test_database_errors_are_one_clear_line_without_password(dagster_home):
    env = cli_env(DATABASE_URL="postgresql://app:Hunter2Secret@127.0.0.1:1/craftflow", MIGRATION_MODE="startup")
    result = run_cli(env=env)
    assert result.returncode == 2
    assert result.stdout.startswith("❌ Database connection failed:")
    assert "Hunter2Secret" not in result.stdout + result.stderr
    missing = run_cli(env={k: v for k, v in env.items() if k != "DATABASE_URL"})
    assert missing.returncode == 2 and "Database connection failed: DATABASE_URL is not set" in missing.stdout
    bad_mode = run_cli(env={**env, "MIGRATION_MODE": "everything"})
    assert bad_mode.returncode == 2 and "MIGRATION_MODE='everything' is not one of" in bad_mode.stdout


def test_all_mode_without_nas_warns_and_carries_on(database_url, dagster_home):
    result = run_cli(env=cli_env(MIGRATION_MODE="all", NAS_BASE_PATH="/nonexistent/graphics"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NAS credentials not configured, skipping NAS migration" in result.stdout
    assert "Complex migrations: ok" in result.stdout
    nas_only = run_cli(env=cli_env(MIGRATION_MODE="nas-only", NAS_BASE_PATH="/nonexistent/graphics"))
    assert nas_only.returncode == 2 and "NAS credentials not configured: set QNAP_HOST" in nas_only.stdout


def test_two_runners_at_once_apply_each_migration_exactly_once(database_url, dagster_home):
    env = cli_env(MIGRATION_MODE="startup")
    procs = [subprocess.Popen([*CLI], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with get_engine(database_url).connect() as conn:
        rows = conn.execute(text("SELECT name, count(*) FROM craftflow_schema_migrations GROUP BY name")).all()
    assert len(rows) == len(discover(PACKAGE_MIGRATIONS).of_kind("startup")) and all(c == 1 for _, c in rows)


def test_downgrade_and_repair_commands(migrated_url, dagster_home):
    env = cli_env()
    result = run_cli("downgrade", "--to", "separate_platform_connections", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("rolled back update_phash_hash_size, register_thumbnail_packs, store_design_thumbnails_in_packs, "
            "store_design_thumbnails_uncompressed, remove_shopify_unique_constraint") in result.stdout
    refused = run_cli("downgrade", "--to", "no_such_migration", env=env)
    assert refused.returncode == 1 and "Cannot downgrade to no_such_migration: no such migration" in refused.stdout
    repaired = run_cli("repair", "add_etsy_shop_id", env=env)
    assert repaired.returncode == 0 and "ledger already matches the file" in repaired.stdout


def test_canvas_size_migration_resumes_after_being_killed(migrated_url, dagster_home):
    engine = get_engine(migrated_url)
    total = 60_000
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO canvas_sizes (label) SELECT CASE WHEN i % 1000 = 0 THEN 'custom' "
            "ELSE (i % 40 + 4) || 'x' || (i % 30 + 6) END FROM generate_series(1, :n) i"
        ), {"n": total})
    env = cli_env(MIGRATION_MODE="complex", CANVAS_MIGRATION_BATCH_SIZE="100")
    proc = subprocess.Popen(CLI, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    done = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM canvas_sizes WHERE width_in IS NOT NULL")).scalar()
        if done > 2_000:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done < total, "the migration must be killed midway"
    with engine.connect() as conn:
        checkpoint = conn.execute(text("SELECT last_id FROM craftflow_migration_checkpoints")).scalar()
        assert checkpoint and checkpoint > 0
        assert conn.execute(text(
            "SELECT count(*) FROM craftflow_schema_migrations WHERE name = 'run_canvas_size_migration'")).scalar() == 0

    result = run_cli(env={**env, "CANVAS_MIGRATION_BATCH_SIZE": "5000"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming run_canvas_size_migration after id" in result.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM canvas_sizes WHERE width_in IS NULL")).scalar() == total // 1000
        assert conn.execute(text(
            "SELECT count(*) FROM canvas_sizes WHERE label <> 'custom' AND "
            "(width_in <> split_part(label, 'x', 1)::numeric OR height_in <> split_part(label, 'x', 2)::numeric)"
        )).scalar() == 0


def test_nas_failures_are_one_line_each(migrated_url, dagster_home, sshd, tmp_path):
    """Wrong password, unknown host key, unreachable host: one line naming the host, exit 2."""
    from .support import free_port

    base = tmp_path / "G"
    (base / "S" / "T").mkdir(parents=True)
    env = cli_env(**sshd.env(base), MIGRATION_MODE="nas-only")
    cases = {
        "unreachable": ({"QNAP_PORT": str(free_port())}, "Cannot reach NAS 127.0.0.1:"),
        "unknown key": ({"QNAP_KNOWN_HOSTS": str(tmp_path / "empty_known_hosts")}, "Unknown SSH host key for [127.0.0.1]:"),
    }
    (tmp_path / "empty_known_hosts").write_text("")
    if sshd.password_user:
        cases["wrong password"] = ({"QNAP_USERNAME": sshd.password_user, "QNAP_KEY_FILE": "",
                                    "QNAP_PASSWORD": "not-the-password"}, "refused the login of 'cfm_sftp_test'")
    for name, (overrides, expected) in cases.items():
        result = run_cli(env={**env, **overrides}, timeout=120)
        lines = [line for line in result.stdout.splitlines() if line.startswith("❌")]
        assert result.returncode == 2, (name, result.stdout + result.stderr)
        assert len(lines) == 1 and expected in lines[0], (name, result.stdout)
        assert "Traceback" not in result.stdout + result.stderr, name
        assert "not-the-password" not in result.stdout + result.stderr


def test_demo_masks_a_supplied_database_url(postgres_server, database_url, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password="Dm0-Pw9xK").render_as_string(hide_password=False)
    env = {k: v for k, v in cli_env(DATABASE_URL=url).items() if k != "DAGSTER_HOME"}
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DATABASE_URL='postgresql://postgres:***@" in result.stdout
    assert "Dm0-Pw9xK" not in result.stdout + result.stderr


# The CLI as a module, reporting afterwards whether Dagster was ever imported.
WITHOUT_DAGSTER = """
import sys
from craftflow_migrations import cli
code = cli.main([])
print("dagster imported:", "dagster" in sys.modules)
print("numpy imported:", "numpy" in sys.modules)
sys.exit(code)
"""


def test_unchanged_nas_rerun_needs_no_dagster_and_a_change_brings_it_back(migrated_url, dagster_home, tmp_path):
    from craftflow_migrations.sample_nas import write_sample_nas

    base = write_sample_nas(tmp_path / "nas")
    env = cli_env(MIGRATION_MODE="nas-only", NAS_BASE_PATH=str(base))
    first = run_cli(env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    with get_engine(migrated_url).begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM nas_partition_state")).scalar() == 3
        # As after an upgrade: the table is new and empty, Dagster alone knows the imports.
        conn.execute(text("DELETE FROM nas_partition_state"))
    refill = subprocess.run([sys.executable, "-c", WITHOUT_DAGSTER], env=env, capture_output=True, text=True,
                            timeout=300)
    assert "3 unchanged since their last import" in refill.stdout and "dagster imported: True" in refill.stdout
    rerun = subprocess.run([sys.executable, "-c", WITHOUT_DAGSTER], env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "3 unchanged since their last import" in rerun.stdout and "dagster imported: False" in rerun.stdout
    assert "numpy imported: False" in rerun.stdout  # nor the hashing behind it
    assert "Duplicate groups: unchanged" in rerun.stdout
    # One new file: back through Dagster, exactly that file imported.
    new = next(base.glob("*/*/*.png"))
    (new.parent / "new design.png").write_bytes(new.read_bytes()[:-1] + b"\0")
    changed = subprocess.run([sys.executable, "-c", WITHOUT_DAGSTER], env=env, capture_output=True, text=True,
                             timeout=300)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "1 imported" in changed.stdout and "dagster imported: True" in changed.stdout
