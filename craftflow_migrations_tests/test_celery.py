"""The import's batch steps on Celery workers: Redis on loopback, two worker processes."""

import subprocess
import sys
import time

import pytest
import redis
from sqlalchemy import text

from craftflow_migrations.db import get_engine

from .conftest import cli_env, migrate
from .support import write_corpus

pytestmark = pytest.mark.slow
BROKER_DB = 11


def table(url: str) -> set[tuple]:
    with get_engine(url).connect() as conn:
        return set(conn.execute(text(
            "SELECT path, status::text, sha256, phash, width, height FROM design_images")).all())


@pytest.fixture
def broker():
    client = redis.Redis(host="127.0.0.1", port=6379, db=BROKER_DB)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (start it: redis-server --daemonize yes)")
    client.flushdb()
    redis.Redis(host="127.0.0.1", port=6379, db=BROKER_DB + 1).flushdb()
    yield f"redis://127.0.0.1:6379/{BROKER_DB}", f"redis://127.0.0.1:6379/{BROKER_DB + 1}"
    client.flushdb()


def test_batches_run_on_celery_workers_and_match_multiprocess(postgres_server, migrated_url, broker, tmp_path):
    base = tmp_path / "G"
    write_corpus(base, {("Celery Shop", "T"): 12}, size=(800, 600))
    broker_url, backend_url = broker
    io_dir = tmp_path / "shared_io"
    common = dict(NAS_BASE_PATH=str(base), CELERY_BROKER_URL=broker_url, CELERY_BACKEND_URL=backend_url,
                  CRAFTFLOW_IO_DIR=str(io_dir), NAS_MAX_CONCURRENT="2")
    celery_home = tmp_path / "celery_home"
    celery_home.mkdir()
    from craftflow_migrations.instance import LOCAL_DAGSTER_YAML

    (celery_home / "dagster.yaml").write_text(LOCAL_DAGSTER_YAML)
    env = cli_env(**common, DATABASE_URL=migrated_url, DAGSTER_HOME=str(celery_home), CRAFTFLOW_EXECUTOR="celery")
    logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "craftflow_migrations.celery_app", "worker", "-Q", "dagster",
             "-c", "1", "-n", f"w{i}@%h", "--without-gossip", "--without-mingle", "-l", "info"],
            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        for i, log in zip((1, 2), logs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all("ready" in log.read_text() for log in logs):
            time.sleep(0.5)
        result = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "import", "--batch-mb", "2"],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
    worker_logs = [log.read_text() for log in logs]
    assert all("execute_plan" in text_ and "succeeded" in text_ for text_ in worker_logs), "both workers ran steps"

    # The same import with the multiprocess executor, into another database.
    other = postgres_server.create_database()
    try:
        migrate(other)
        mp_home = tmp_path / "mp_home"
        mp_home.mkdir()
        (mp_home / "dagster.yaml").write_text(LOCAL_DAGSTER_YAML)
        mp_env = cli_env(NAS_BASE_PATH=str(base), DATABASE_URL=other, DAGSTER_HOME=str(mp_home))
        mp = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli", "import"], env=mp_env,
                            capture_output=True, text=True, timeout=600)
        assert mp.returncode == 0, mp.stdout + mp.stderr[-3000:]
        assert table(migrated_url) == table(other) and len(table(other)) == 12
    finally:
        get_engine(other).dispose()
        postgres_server.drop_database(other)
    assert any(io_dir.rglob("*")), "step outputs went to the configured shared storage"
