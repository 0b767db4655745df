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


def _env(name: str, default: str = "") -> str:
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else default


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "postgres": PostgresResource(database_url=dg.EnvVar("DATABASE_URL")),
        "nas": NasResource(
            host=_env("QNAP_HOST"),
            username=_env("QNAP_USERNAME"),
            password=_env("QNAP_PASSWORD"),
            port=dg.EnvVar.int("QNAP_PORT") if os.environ.get("QNAP_PORT", "").strip() else 22,
            base_path=_env("NAS_BASE_PATH", DEFAULT_NAS_BASE_PATH),
            key_file=_env("QNAP_KEY_FILE"),
            known_hosts=_env("QNAP_KNOWN_HOSTS"),
            host_key_fingerprint=_env("QNAP_HOST_KEY_FINGERPRINT"),
            use_batched=_env("NAS_USE_BATCHED", "true"),
        ),
    }
