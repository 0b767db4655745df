"""Database engines and the Dagster resource that hands them out.

The URL reaches steps through ``EnvVar`` so its password never lands in run config or the
event log; every message that could carry it goes through :func:`redact`.
"""

from __future__ import annotations

import functools

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .settings import ConfigError, check_database_url, environment_secrets, url_passwords


class DatabaseConnectionError(RuntimeError):
    """The database cannot be reached; the message never holds the password."""


def redact(message: str, url: str | None = None) -> str:
    """Remove the URL and its password (raw or percent-decoded) from a message.

    Every secret of the settings is removed too, so a caller that forgets to pass the URL
    still cannot leak one.
    """
    secrets = set(environment_secrets())
    if url:
        secrets.add(url)
        secrets.update(url_passwords(url))
    for secret in sorted(secrets, key=len, reverse=True):
        if secret.startswith(("postgres", "redis", "amqp")) and "://" in secret:
            message = message.replace(secret, safe_url(secret))
        else:
            message = message.replace(secret, "***")
    return message


def safe_url(url: str) -> str:
    """``user:***@host``; never any part of a password, even of a malformed URL."""
    try:
        check_database_url(url)
        return make_url(url).render_as_string(hide_password=True)
    except (ConfigError, ArgumentError, ValueError):
        return "<malformed DATABASE_URL>"


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process; ops and sensors share it."""
    try:
        check_database_url(url)
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid URL: expected postgresql://user:password@host:5432/dbname") \
            from None
    if parsed.drivername in ("postgres", "postgresql"):
        # Railway and Heroku hand out postgres:// URLs; psycopg2 is the driver we ship.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        # hide_parameters: a failed statement's values (file names, tokens) stay out of messages.
        hide_parameters=True,
        connect_args={"connect_timeout": 10, "application_name": "craftflow_migrations"},
    )


def error_line(exc: BaseException) -> str:
    """The first line of a database (or any) error, without its SQL or parameters."""
    orig = getattr(exc, "orig", None)
    if orig is not None:
        return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    text_ = f"{type(exc).__name__}: {exc}".strip()
    return text_.splitlines()[0]


def check_connection(url: str) -> None:
    """Fail with one clean line when the database cannot be reached."""
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseConnectionError(
            redact(f"Database connection failed: {error_line(exc)} ({safe_url(url)})", url)
        ) from None
