"""Every resource, configured from the service's environment in one place.

Secrets are ``EnvVar`` references: Dagster resolves them in the process that runs the
step, so the values never enter run config, logs or the event log. Variables that are
not set fall back to the documented defaults instead of failing the code location.
"""

from __future__ import annotations

import os

import dagster as dg

from .db import PostgresResource
from .nas.resource import NasResource
from .settings import DEFAULT_NAS_BASE_PATH

# NasResource field -> (environment variable, default when unset)
NAS_ENV = {
    "host": ("QNAP_HOST", ""),
    "username": ("QNAP_USERNAME", ""),
    "password": ("QNAP_PASSWORD", ""),
    "port": ("QNAP_PORT", 22),
    "base_path": ("NAS_BASE_PATH", DEFAULT_NAS_BASE_PATH),
    "key_file": ("QNAP_KEY_FILE", ""),
    "known_hosts": ("QNAP_KNOWN_HOSTS", ""),
    "host_key_fingerprint": ("QNAP_HOST_KEY_FINGERPRINT", ""),
    "use_batched": ("NAS_USE_BATCHED", "true"),
}


def _is_set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def nas_resource() -> NasResource:
    values = {}
    for field, (env, default) in NAS_ENV.items():
        if not _is_set(env):
            values[field] = default
        else:
            values[field] = dg.EnvVar.int(env) if field == "port" else dg.EnvVar(env)
    return NasResource(**values)


def nas_from_env() -> NasResource:
    """The NAS resource with values read now, for code that runs outside a Dagster step."""
    values = {}
    for field, (env, default) in NAS_ENV.items():
        raw = os.environ.get(env, "").strip()
        values[field] = (int(raw) if field == "port" else raw) if raw else default
    return NasResource(**values)


def build_resources() -> dict:
    resources = {
        "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL")),
        "nas": nas_resource(),
    }
    if _is_set("CRAFTFLOW_IO_DIR"):
        # Step outputs (batch plans and results) where every worker machine can read them.
        resources["io_manager"] = dg.FilesystemIOManager(base_dir=dg.EnvVar("CRAFTFLOW_IO_DIR"))
    return resources
