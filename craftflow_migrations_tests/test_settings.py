"""One typed settings model: every bad value is one line naming the variable, exit code 2,
and no part of a password ever printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from craftflow_migrations.settings import ConfigError, from_env

from .conftest import cli_env

CLI = [sys.executable, "-m", "craftflow_migrations.cli"]
PASSWORD = "Zq9-Wv7_Kx3-Lm4"


def fragments(secret: str, length: int = 4) -> set[str]:
    """Every piece of the secret long enough to give it away."""
    return {secret[i:i + length] for i in range(len(secret) - length + 1)}


BAD = [
    ({"DATABASE_URL": f"postgresql://app:{PASSWORD}@ssw0rd@db.internal:5432/craftflow"}, "DATABASE_URL",
     "percent-encode '@' in the password as %40"),
    ({"DATABASE_URL": f"postgresql://app:{PASSWORD}@db:54x2/craftflow"}, "DATABASE_URL", "port '54x2' is not a number"),
    ({"DATABASE_URL": f"postgresql://app:{PASSWORD}/x@db/craftflow"}, "DATABASE_URL", "percent-encode"),
    ({"DATABASE_URL": f"mysql://app:{PASSWORD}@db/craftflow"}, "DATABASE_URL", "expected postgresql://"),
    ({"DATABASE_URL": PASSWORD}, "DATABASE_URL", "is not a URL"),
    ({"QNAP_PORT": "abc"}, "QNAP_PORT='abc'", "whole number from 1 to 65535"),
    ({"QNAP_PORT": "70000"}, "QNAP_PORT=70000", "out of range"),
    ({"NAS_MAX_CONCURRENT": "abc"}, "NAS_MAX_CONCURRENT='abc'", "whole number"),
    ({"NAS_MAX_CONCURRENT": "0"}, "NAS_MAX_CONCURRENT=0", "out of range"),
    ({"MIGRATION_LOCK_TIMEOUT": "abc"}, "MIGRATION_LOCK_TIMEOUT='abc'", "not a number of seconds"),
    ({"MIGRATION_LOCK_TIMEOUT": "inf"}, "MIGRATION_LOCK_TIMEOUT='inf'", "finite number of seconds"),
    ({"MIGRATION_LOCK_TIMEOUT": "nan"}, "MIGRATION_LOCK_TIMEOUT='nan'", "finite number of seconds"),
    ({"MIGRATION_LOCK_TIMEOUT": "0.0004"}, "MIGRATION_LOCK_TIMEOUT='0.0004'", "at least 0.001"),
    ({"MIGRATION_STATEMENT_TIMEOUT": "0"}, "MIGRATION_STATEMENT_TIMEOUT='0'", "at least 0.001"),
    ({"CANVAS_MIGRATION_BATCH_SIZE": "0"}, "CANVAS_MIGRATION_BATCH_SIZE=0", "out of range"),
    ({"MIGRATION_MODE": "everything"}, "MIGRATION_MODE='everything'", "is not one of: all, startup"),
    ({"CRAFTFLOW_EXECUTOR": "k8s"}, "CRAFTFLOW_EXECUTOR='k8s'", "is not one of: multiprocess, celery"),
    ({"NAS_USE_BATCHED": "maybe"}, "NAS_USE_BATCHED='maybe'", "is not one of: true, false"),
    ({"MAX_FAILED_SHARE": "2"}, "MAX_FAILED_SHARE='2'", "from 0 to 1"),
    ({"QNAP_HOST_KEY_FINGERPRINT": "abc"}, "QNAP_HOST_KEY_FINGERPRINT='abc'", "SHA256:"),
    ({"CRAFTFLOW_THUMBNAIL_STORE": "disk"}, "CRAFTFLOW_THUMBNAIL_STORE='disk'", "is not one of: folder, postgres"),
    ({"CRAFTFLOW_THUMBNAIL_DIR": "thumbs"}, "CRAFTFLOW_THUMBNAIL_DIR='thumbs'", "is not an absolute path"),
]


@pytest.mark.parametrize("env,variable,allowed", BAD, ids=[f"{k}={v}"[:40] for k, v in (next(iter(e.items()))
                                                                                        for e, _, _ in BAD)])
def test_a_bad_value_is_one_line_naming_the_variable(env, variable, allowed):
    with pytest.raises(ConfigError) as info:
        from_env(env)
    message = str(info.value)
    assert "\n" not in message and variable in message and allowed in message
    assert not any(piece in message for piece in fragments(PASSWORD)), message


def test_good_values_parse_into_types():
    settings = from_env({"DATABASE_URL": "postgres://app:p%40ss@db:5432/x", "QNAP_PORT": "2222",
                         "MIGRATION_LOCK_TIMEOUT": "0.5", "NAS_USE_BATCHED": "false", "NAS_MAX_CONCURRENT": "8"})
    assert settings.nas.port == 2222 and settings.migrations.lock_timeout_s == 0.5
    assert settings.nas.use_batched is False and settings.nas.max_concurrent == 8
    assert "p@ss" in settings.secrets() and "p%40ss" in settings.secrets()


def test_thumbnails_go_to_a_folder_beside_the_instance_unless_steps_share_none():
    """Packs under DAGSTER_HOME by default; runs on several machines (Celery steps, or a
    webserver, daemon and worker sharing an instance in PostgreSQL) share no folder unless
    one is named, so there they stay in PostgreSQL."""
    assert from_env({"DAGSTER_HOME": "/srv/dagster"}).nas.thumbnail_folder.as_posix() == "/srv/dagster/thumbnails"
    assert from_env({"DAGSTER_HOME": "/srv/dagster"}).nas.thumbnail_store == "folder"
    assert from_env({"CRAFTFLOW_EXECUTOR": "celery"}).nas.thumbnail_store == "postgres"
    assert from_env({"DAGSTER_POSTGRES_URL": "postgresql://d@db/dagster"}).nas.thumbnail_store == "postgres"
    shared = from_env({"CRAFTFLOW_EXECUTOR": "celery", "CRAFTFLOW_THUMBNAIL_DIR": "/mnt/shared/thumbs"}).nas
    assert (shared.thumbnail_store, shared.thumbnail_folder.as_posix()) == ("folder", "/mnt/shared/thumbs")
    assert from_env({"CRAFTFLOW_THUMBNAIL_STORE": "postgres"}).nas.thumbnail_store == "postgres"


def test_nas_concurrency_defaults_to_the_cores_this_process_may_use():
    # Pinned to one core (taskset, a container's cpuset), the default is one batch step, not
    # one per core of the host.
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from craftflow_migrations.settings import from_env; print(from_env({}).nas.max_concurrent)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "1"
    assert from_env({}).nas.max_concurrent == len(os.sched_getaffinity(0))


def test_the_cli_exits_2_with_one_line_and_no_password(dagster_home):
    for env, variable, _ in BAD[:2] + BAD[5:6] + BAD[10:11]:
        result = subprocess.run(CLI, env=cli_env(**{"DATABASE_URL": "postgresql://postgres@127.0.0.1/x", **env}),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout.count("\n") == 1 and result.stdout.startswith("❌ ") and variable in result.stdout
        assert "Traceback" not in result.stderr
        assert not any(piece in result.stdout + result.stderr for piece in fragments(PASSWORD))
