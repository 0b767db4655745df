"""The image's entrypoint, run as the Dockerfile runs it, in a clean virtualenv.

No Docker engine runs on the CI machine, so this does what the Dockerfile does: a fresh
venv, ``pip install .`` (not editable), the production dagster.yaml (PostgreSQL storage from
DAGSTER_POSTGRES_URL) in DAGSTER_HOME, then the default command from another directory.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_worker_entrypoint_in_clean_virtualenv(migrated_url, postgres_server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    dagster_db = postgres_server.create_database("cfm_dagster")
    workdir = tmp_path / "app"
    workdir.mkdir()
    env = cli_env(DATABASE_URL=migrated_url, DAGSTER_HOME=str(home), DAGSTER_POSTGRES_URL=dagster_db,
                  MIGRATION_MODE="all", PATH=f"{venv / 'bin'}:/usr/bin:/bin")
    try:
        result = subprocess.run(["craftflow-migrate"], cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert "NAS credentials not configured, skipping NAS migration" in result.stdout
        assert "Complex migrations: ok" in result.stdout
        import psycopg2

        conn = psycopg2.connect(dagster_db)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs")
            assert cur.fetchone()[0] == 2  # startup and complex_migrations, in Dagster's PostgreSQL storage
        conn.close()
    finally:
        postgres_server.drop_database(dagster_db)
