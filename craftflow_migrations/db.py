"""Database engines and the Dagster resource that hands them out.

The URL comes from the environment through ``EnvVar`` so its password never lands in
run config or the event log; every message that could carry it goes through
:func:`redact`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError


class DatabaseConnectionError(RuntimeError):
    """The database cannot be reached; the message never holds the password."""


def redact(message: str, url: str | None) -> str:
    """Remove the URL's password (and the URL itself) from a message."""
    if not url:
        return message
    try:
        parsed = make_url(url)
    except ArgumentError:
        return message.replace(url, "<DATABASE_URL>")
    message = message.replace(url, parsed.render_as_string(hide_password=True))
    if parsed.password:
        message = message.replace(str(parsed.password), "***")
    return message


def safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable DATABASE_URL>"


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process; ops and sensors share it."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseConnectionError(
            "Database connection failed: DATABASE_URL is not a valid URL "
            "(expected postgresql://user:password@host:5432/dbname)"
        ) from None
    if parsed.drivername in ("postgres", "postgresql"):
        # Railway and Heroku hand out postgres:// URLs; psycopg2 is the driver we ship.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        connect_args={"connect_timeout": 10, "application_name": "craftflow_migrations"},
    )


def check_connection(url: str) -> None:
    """Fail with one clean line when the database cannot be reached."""
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseConnectionError(
            redact(f"Database connection failed: {detail} ({safe_url(url)})", url)
        ) from None


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL from ``DATABASE_URL``; configure it with ``EnvVar('DATABASE_URL')``."""

    database_url: str

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def redact(self, message: str) -> str:
        return redact(message, self.database_url)
