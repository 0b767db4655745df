"""Every resource of the code location, in one place.

Secrets reach steps as ``EnvVar`` references or through the settings model inside the step:
Dagster resolves them in the process that runs the step, so the values never enter run
config, logs or the event log.
"""

from __future__ import annotations

import dagster as dg

from .db import PostgresResource
from .nas.resource import NasResource
from .settings import get_settings


def build_resources() -> dict:
    resources = {
        "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL")),
        "nas": NasResource(),
    }
    if get_settings().io_dir:
        # Step outputs (batch plans and results) where every worker machine can read them.
        resources["io_manager"] = dg.FilesystemIOManager(base_dir=dg.EnvVar("CRAFTFLOW_IO_DIR"))
    return resources
