"""A production day for real: racing deploys, a DBA's long transaction, terminated sessions.

Real processes, real PostgreSQL; every test asserts the database's end state.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from sqlalchemy import text

from craftflow_migrations.db import get_engine
from craftflow_migrations.duplicates import store as dup_store
from craftflow_migrations.duplicates.grouping import find_groups
from craftflow_migrations.nas import store
from craftflow_migrations.nas.hashing import ImageFacts
from craftflow_migrations.nas.listing import NasFile
from craftflow_migrations.schema import ledger
from craftflow_migrations.schema.discovery import discover
from craftflow_migrations.schema.helpers import index_state
from craftflow_migrations.schema.runner import run_pending
from craftflow_migrations.settings import MigrationSettings

from .conftest import cli_env

CLI = [sys.executable, "-m", "craftflow_migrations.cli"]
FAST = MigrationSettings(lock_timeout_s=0.2, statement_timeout_s=60, lock_retries=12, runner_lock_wait_s=60)


def _wait_for(engine, sql: str, params: dict | None = None, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            value = conn.execute(text(sql), params or {}).scalar()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {sql}")


def test_terminated_runner_session_stops_and_a_second_runner_applies_once(database_url, dagster_home, tmp_path):
    """The runner's session is terminated mid-migration while a second deploy waits for the lock."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a_log.py").write_text(
        "from sqlalchemy import text\nDEPENDS_ON = []\n"
        "def upgrade(connection):\n"
        "    connection.execute(text('CREATE TABLE IF NOT EXISTS applied_log (name text, at timestamptz DEFAULT now())'))\n"
    )
    # Non-transactional and slow: the case where applying twice used to happen.
    (folder / "b_slow_non_transactional.py").write_text(
        "from sqlalchemy import text\nDEPENDS_ON = ['a_log']\nTRANSACTIONAL = False\n"
        "def upgrade(connection):\n"
        "    connection.execute(text('SELECT pg_sleep(4)'))\n"
        "    connection.execute(text(\"INSERT INTO applied_log (name) VALUES ('b')\"))\n"
    )
    env = cli_env(MIGRATION_MODE="startup", CRAFTFLOW_MIGRATIONS_DIR=str(folder))
    engine = get_engine(database_url)
    first = subprocess.Popen(CLI, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = _wait_for(engine, "SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(4)%' "
                            "AND datname = current_database()")
    second = subprocess.Popen(CLI, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # the second runner is up and polling for the lock
    with engine.connect() as conn:
        holder = conn.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")).scalars().all()
        assert holder == [pid]  # the lock is held by the very session that runs the migration
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 1, out1 + err1
    assert "lost its PostgreSQL session (and with it the migration lock) while applying b_slow_non_transactional" \
        in out1
    assert "Traceback" not in out1
    assert second.returncode == 0, out2 + err2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM applied_log WHERE name = 'b'")).scalar() == 1
        counts = dict(conn.execute(text(
            f"SELECT name, count(*) FROM {ledger.LEDGER_TABLE} GROUP BY name")).all())
    assert counts == {"a_log": 1, "b_slow_non_transactional": 1}


def test_long_transaction_migration_gives_way_and_concurrent_index_is_not_cancelled(engine, tmp_path):
    """A DBA's transaction (or a pg_dump) stays open for seconds: DDL retries, CIC waits it out."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE busy (id int)"))
        conn.execute(text("CREATE TABLE other (id int, code text)"))
        conn.execute(text("INSERT INTO other SELECT i, i::text FROM generate_series(1, 1000) i"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a_index_other.py").write_text(
        "from craftflow_migrations.schema.helpers import create_index_concurrently\n"
        "DEPENDS_ON = []\nTRANSACTIONAL = False\n"
        "def upgrade(connection):\n"
        "    create_index_concurrently(connection, 'other_code_idx', 'other', 'code')\n"
    )
    (folder / "b_alter_busy.py").write_text(
        "from sqlalchemy import text\nDEPENDS_ON = []\n"
        "def upgrade(connection):\n    connection.execute(text('ALTER TABLE busy ADD COLUMN note text'))\n"
    )
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT count(*) FROM busy"))  # ACCESS SHARE on busy, and an old snapshot
    threading.Timer(3.0, tx.rollback).start()
    started = time.monotonic()
    report = run_pending(engine, discover(folder), "startup", FAST)
    holder.close()
    assert report.failed == [], report.results
    results = {r.name: r for r in report.results}
    assert results["a_index_other"].attempts == 1  # waited for the old snapshot, never cancelled
    assert time.monotonic() - started >= 2.5
    with engine.connect() as conn:
        assert index_state(conn, "other_code_idx") == "valid"
        assert "note" in {c for (c,) in conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'busy'"))}


def _image(i: int, phash: str, sha: str) -> tuple[NasFile, ImageFacts]:
    return NasFile("S", "T", f"S/T/{i}.png", 10, 0), ImageFacts(sha, phash, 100, 100, "PNG")


def test_two_duplicates_runs_at_once_leave_one_set_of_groups(migrated_url):
    engine = get_engine(migrated_url)
    with engine.begin() as conn:
        rows = [store.row_for(f, facts, store.EPOCH) for f, facts in (
            _image(1, "0" * 64, "a" * 64), _image(2, "0" * 64, "a" * 64),
            _image(3, "f" * 64, "b" * 64), _image(4, "f" * 63 + "e", "c" * 64))]
        store.upsert(conn, rows)

    def regroup(hold_s: float) -> None:
        with engine.begin() as conn:
            dup_store.lock_groups(conn)
            groups = find_groups(dup_store.load_images(conn))
            dup_store.replace_groups(conn, groups, 22)
            time.sleep(hold_s)  # the other run arrives while this one is still writing

    first = threading.Thread(target=regroup, args=(1.0,))
    first.start()
    time.sleep(0.2)
    regroup(0.0)
    first.join()
    with engine.connect() as conn:
        groups = conn.execute(text("SELECT count(*) FROM design_duplicate_groups")).scalar()
        members = conn.execute(text("SELECT count(*) FROM design_duplicate_members")).scalar()
    assert (groups, members) == (2, 4)


def test_two_imports_of_one_folder_at_once_never_resurrect_a_removed_file(migrated_url):
    """Import A listed the folder first; B listed after the file was deleted and marked it removed;
    A's batch then writes its (older) row: the newer listing wins."""
    engine = get_engine(migrated_url)
    f = NasFile("S", "T", "S/T/gone.png", 10, 1_000_000)
    facts = ImageFacts("a" * 64, "0" * 64, 10, 10, "PNG")
    with engine.begin() as conn:
        listed_a = store.db_now(conn)
        store.upsert(conn, [store.row_for(f, facts, store.EPOCH)])  # imported long ago
    with engine.begin() as conn:
        listed_b = store.db_now(conn)
        assert store.mark_removed(conn, [("S", "T", f.path)], listed_b) == 1
    with engine.begin() as conn:
        store.upsert(conn, [store.row_for(f, facts, listed_a)])  # A's batch, late
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status::text FROM design_images WHERE path = :p"), {"p": f.path}).scalar()
    assert status == "removed"
    # And the other way round: a removal from an older listing does not undo a newer import.
    with engine.begin() as conn:
        listed_c = store.db_now(conn)
        store.upsert(conn, [store.row_for(f, facts, listed_c)])
        assert store.mark_removed(conn, [("S", "T", f.path)], listed_b) == 0
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status::text FROM design_images WHERE path = :p"), {"p": f.path}).scalar()
    assert status == "ok"


# --- the NAS import under faults: real CLI processes, a real sshd, rows checked afterwards ---

def _import_cmd(key: str) -> list[str]:
    return [*CLI, "import", "--partition", key]


def _rows(engine, shop: str) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), "
            "count(*) FILTER (WHERE imported_at > first_seen_at) FROM design_images WHERE shop = :s"),
            {"s": shop}).one()


def _wait_rows(engine, shop: str, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline and proc.poll() is None:
        count = _rows(engine, shop)[0]
        if count >= at_least:
            return count
        time.sleep(0.02)
    raise AssertionError(f"import did not reach {at_least} rows (had {count}, exit {proc.poll()})")


def _start_local_import(url: str, tmp_path, shop: str):
    """A real `craftflow-migrate import` of 40 designs in a subprocess, once it has committed rows."""
    from .support import write_corpus

    base = tmp_path / "G"
    write_corpus(base, {(shop, "T"): 40}, size=(800, 600))
    env = cli_env(NAS_BASE_PATH=str(base), NAS_COMMIT_EVERY="2")
    engine = get_engine(url)
    proc = subprocess.Popen(_import_cmd(f"{shop}/T"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_rows(engine, shop, 4, proc)
    return engine, env, proc


def test_batch_step_killed_mid_import_then_rerun_imports_each_file_once(migrated_url, dagster_home, tmp_path):
    import psutil

    engine, env, proc = _start_local_import(migrated_url, tmp_path, "Kill Step")
    # The batch step is the process holding a connection that writes design_images rows.
    with engine.connect() as conn:
        port = conn.execute(text(
            "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'craftflow_migrations' AND pid <> pg_backend_pid() "
            "ORDER BY backend_start DESC LIMIT 1")).scalar()
    step = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port)
    assert step != proc.pid  # a step process, not the worker
    psutil.Process(step).kill()
    out, _ = proc.communicate(timeout=300)
    rows_after_kill = _rows(engine, "Kill Step")[0]
    assert 0 < rows_after_kill <= 40
    # Packs are made durable before the rows that index them commit: every committed row
    # shows its picture, though the step died mid-flush.
    assert _rows_without_a_readable_thumbnail(engine, "Kill Step") == []
    rerun = subprocess.run(_import_cmd("Kill Step/T"), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _rows(engine, "Kill Step") == (40, 40, 0)  # each file once, none imported twice
    assert _rows_without_a_readable_thumbnail(engine, "Kill Step") == []


def _rows_without_a_readable_thumbnail(engine, shop: str) -> list[str]:
    from craftflow_migrations.nas import store

    with engine.connect() as conn:
        shas = conn.execute(text("SELECT sha256 FROM design_images WHERE shop = :s AND status = 'ok'"),
                            {"s": shop}).scalars().all()
        packed = conn.execute(text("SELECT count(*) FROM design_thumbnails WHERE pack IS NOT NULL")).scalar()
        found = store.thumbnails(conn, shas)
    assert packed > 0  # the default: thumbnails in packs beside the instance
    return [sha for sha in shas if sha not in found]


def test_sshd_down_mid_batch_retries_when_back_and_fails_clearly_when_not(migrated_url, dagster_home, tmp_path):
    from .support import SshServer, write_corpus

    server = SshServer(tmp_path / "sshd")
    try:
        base = tmp_path / "G"
        write_corpus(base, {("Flaky NAS", "T"): 40, ("Dead NAS", "T"): 40}, size=(800, 600))
        env = cli_env(**server.env(base), NAS_COMMIT_EVERY="2")
        engine = get_engine(migrated_url)

        proc = subprocess.Popen(_import_cmd("Flaky NAS/T"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        _wait_rows(engine, "Flaky NAS", 4, proc)
        server.kill()
        time.sleep(1.0)
        server.start()  # the NAS is back before the retry's backoff ends
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert _rows(engine, "Flaky NAS") == (40, 40, 0)

        proc = subprocess.Popen(_import_cmd("Dead NAS/T"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        committed = _wait_rows(engine, "Dead NAS", 4, proc)
        server.kill()  # and it stays down
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 1, out
        failure = [line for line in out.splitlines() if line.strip().startswith("❌")]
        assert failure and ("Cannot reach NAS 127.0.0.1" in failure[0] or "Lost the NAS connection" in failure[0]), out
        total, ok, twice = _rows(engine, "Dead NAS")
        assert total >= committed and total == ok and twice == 0  # what was written stays
    finally:
        server.kill()


def test_import_connection_terminated_mid_batch_is_retried_and_completes(migrated_url, dagster_home, tmp_path):
    """pg_terminate_backend on the batch step's connection: the batch is retried, nothing is lost or doubled."""
    engine, _, proc = _start_local_import(migrated_url, tmp_path, "Cut DB")
    with engine.connect() as conn:
        terminated = conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'craftflow_migrations' AND pid <> pg_backend_pid()")).scalar()
    assert terminated >= 1
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert _rows(engine, "Cut DB") == (40, 40, 0)


def _ignore_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_worker_started_with_sigterm_ignored_exits_and_leaves_no_step_server(migrated_url, dagster_home, tmp_path):
    """Some supervisors start workers with SIGTERM ignored; the step forkserver inherits that."""
    import uuid

    import psutil

    from .support import write_corpus

    base = tmp_path / "G"
    write_corpus(base, {("Deaf Shop", "T"): 3}, size=(64, 48))
    mark = uuid.uuid4().hex
    env = cli_env(NAS_BASE_PATH=str(base), CFM_TEST_MARK=mark)
    result = subprocess.run(_import_cmd("Deaf Shop/T"), env=env, capture_output=True, text=True, timeout=120,
                            preexec_fn=_ignore_sigterm)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _rows(get_engine(migrated_url), "Deaf Shop")[0] == 3

    def marked(p: psutil.Process) -> bool:
        try:
            return p.environ().get("CFM_TEST_MARK") == mark
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    assert [p.cmdline() for p in psutil.process_iter() if marked(p)] == []
