from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest

from craftflow_migrations.db import get_engine

from .support import PostgresServer, SshServer

PACKAGE_MIGRATIONS = Path(__file__).resolve().parent.parent / "craftflow_migrations" / "migrations"


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    yield server
    server.stop()


def _dispose(url: str) -> None:
    for candidate in (url, url.replace("postgresql://", "postgresql+psycopg2://")):
        try:
            get_engine(candidate).dispose()
        except Exception:
            pass
    get_engine.cache_clear()


@pytest.fixture
def database_url(postgres_server, monkeypatch):
    """A throwaway database, dropped after the test; DATABASE_URL points at it."""
    url = postgres_server.create_database()
    monkeypatch.setenv("DATABASE_URL", url)
    yield url
    _dispose(url)
    postgres_server.drop_database(url)


@pytest.fixture
def engine(database_url):
    return get_engine(database_url)


def migrate(url: str) -> str:
    """Apply the package's startup migrations to the database at ``url``: it is then at head."""
    from craftflow_migrations.schema.discovery import discover
    from craftflow_migrations.schema.runner import run_pending
    from craftflow_migrations.settings import MigrationSettings

    report = run_pending(get_engine(url), discover(PACKAGE_MIGRATIONS), "startup", MigrationSettings())
    assert not report.failed
    return url


@pytest.fixture
def migrated_url(database_url):
    """A database at head (startup migrations applied)."""
    return migrate(database_url)


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    from craftflow_migrations.instance import LOCAL_DAGSTER_YAML

    (home / "dagster.yaml").write_text(LOCAL_DAGSTER_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home):
    with dg.DagsterInstance.get() as inst:
        yield inst


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def clean_nas_env(monkeypatch):
    for name in ("QNAP_HOST", "QNAP_USERNAME", "QNAP_PASSWORD", "QNAP_PORT", "QNAP_KEY_FILE", "QNAP_KNOWN_HOSTS",
                 "QNAP_HOST_KEY_FINGERPRINT", "NAS_BASE_PATH", "NAS_USE_BATCHED", "MIGRATION_MODE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QNAP_", "NAS_"))}
    env.update(overrides)
    return env
