"""Secrets never leave the process: not in logs, run config, tags, the event log, compute logs or reports."""

from __future__ import annotations

import subprocess
import sys
import uuid
from urllib.parse import quote

import dagster as dg
import pytest
from sqlalchemy.engine import make_url

from .conftest import cli_env
from .support import write_corpus

DB_PASSWORD = "Qx7@Zvq/Pw9-Rtk"
NAS_PASSWORD = "Nq5Pj-Vk8_Zy2w"

pytestmark = pytest.mark.slow


def fragments(secret: str, length: int = 5) -> set[str]:
    return {secret[i:i + length] for i in range(len(secret) - length + 1)}


@pytest.fixture
def secret_url(postgres_server, database_url):
    """The test database through a role whose URL carries a password (trust auth ignores it)."""
    role = f"cfm_secret_{uuid.uuid4().hex[:8]}"
    postgres_server._admin_execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'unused'")
    url = make_url(database_url)
    yield f"postgresql://{role}:{quote(DB_PASSWORD, safe='')}@{url.host}:{url.port}/{url.database}"
    postgres_server.drop_database(database_url)  # what the role owns goes with it
    postgres_server._admin_execute(f"DROP ROLE IF EXISTS {role}")


def test_no_secret_anywhere_after_a_full_run(secret_url, dagster_home, sshd, tmp_path):
    base = tmp_path / "G"
    write_corpus(base, {("Shop A", "T1"): 4, ("Shop B", "T1"): 2}, size=(64, 64))
    env = cli_env(**sshd.env(base), DATABASE_URL=secret_url, QNAP_PASSWORD=NAS_PASSWORD, MIGRATION_MODE="all")
    result = subprocess.run([sys.executable, "-m", "craftflow_migrations.cli"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NAS import: 2 partitions" in result.stdout
    pieces = fragments(DB_PASSWORD) | fragments(quote(DB_PASSWORD, safe="")) | fragments(NAS_PASSWORD)
    places = {"stdout": result.stdout, "stderr": result.stderr}
    for path in dagster_home.rglob("*"):  # event log and run databases, compute logs, the report
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("utf-8", "replace")
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) >= 3
        for run in runs:
            places[f"run {run.run_id} config and tags"] = repr(run.run_config) + repr(run.tags)
            for record in instance.get_records_for_run(run.run_id).records:
                places.setdefault(f"run {run.run_id} events", "")
                places[f"run {run.run_id} events"] += repr(record.event_log_entry)
    leaks = [(where, piece) for where, content in places.items() for piece in pieces if piece in content]
    assert leaks == []
