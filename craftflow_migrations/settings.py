"""The service's environment, read once into typed settings.

Every bad value fails here with one line naming the variable and what to do, so the
rest of the code can trust what it gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("all", "startup", "nas-only", "complex")
DEFAULT_NAS_BASE_PATH = "/share/Graphics"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is one line naming the variable."""


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")
    return value


def migration_mode() -> str:
    mode = os.environ.get("MIGRATION_MODE", "all").strip() or "all"
    if mode not in MODES:
        raise ConfigError(f"MIGRATION_MODE={mode!r} is not one of: {', '.join(MODES)}")
    return mode


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise ConfigError(
            "Database connection failed: DATABASE_URL is not set "
            "(set it to postgresql://user:password@host:5432/dbname)"
        )
    return url


@dataclass(frozen=True)
class MigrationSettings:
    """Timeouts that keep DDL from blocking the live API."""

    lock_timeout_s: float = 5.0
    statement_timeout_s: float = 600.0
    lock_retries: int = 5
    runner_lock_wait_s: float = 300.0

    @classmethod
    def from_env(cls) -> MigrationSettings:
        return cls(
            lock_timeout_s=_float("MIGRATION_LOCK_TIMEOUT", cls.lock_timeout_s),
            statement_timeout_s=_float("MIGRATION_STATEMENT_TIMEOUT", cls.statement_timeout_s),
            lock_retries=_int("MIGRATION_LOCK_RETRIES", cls.lock_retries, minimum=0),
            runner_lock_wait_s=_float("MIGRATION_RUNNER_LOCK_WAIT", cls.runner_lock_wait_s),
        )


def migrations_dir() -> Path:
    """Where migration files live; overridable so tests and plugins can point elsewhere."""
    override = os.environ.get("CRAFTFLOW_MIGRATIONS_DIR", "").strip()
    if override:
        path = Path(override)
        if not path.is_dir():
            raise ConfigError(f"CRAFTFLOW_MIGRATIONS_DIR={override!r} is not a directory")
        return path
    return Path(__file__).parent / "migrations"
