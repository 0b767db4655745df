"""Every resource of the code location, in one place.

Secrets reach steps as ``EnvVar`` references or through the settings model inside the step:
Dagster resolves them in the process that runs the step, so the values never enter run
config, logs or the event log.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from sqlalchemy.engine import Connection, Engine

from .db import get_engine, redact
from .nas.resource import NasResource
from .settings import get_settings


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


def build_resources() -> dict:
    resources = {
        "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL")),
        "nas": NasResource(),
    }
    if get_settings().io_dir:
        # Step outputs (batch plans and results) where every worker machine can read them.
        resources["io_manager"] = dg.FilesystemIOManager(base_dir=dg.EnvVar("CRAFTFLOW_IO_DIR"))
    return resources
