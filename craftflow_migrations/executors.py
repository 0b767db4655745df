"""Which executor runs the NAS import's steps, chosen by CRAFTFLOW_EXECUTOR.

- ``multiprocess`` (default): batch steps in processes on this machine.
- ``celery``: batch steps as Celery tasks on worker machines (``dagster-celery``), broker
  and result backend from CELERY_BROKER_URL / CELERY_BACKEND_URL. Workers need the same
  environment (DATABASE_URL, QNAP_*), the instance (DAGSTER_HOME on PostgreSQL storage
  when they are on other machines) and shared storage for step outputs (CRAFTFLOW_IO_DIR).
- Kubernetes: ``dagster-k8s``'s ``k8s_job_executor`` works the same way (see README); it is
  not installed by default.
"""

from __future__ import annotations

import dagster as dg

from .forkserver import FORKSERVER_PRELOAD
from .settings import get_settings


def executor_kind() -> str:
    return get_settings().executor


def build_executor() -> dg.ExecutorDefinition:
    if executor_kind() == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(
            {
                "broker": {"env": "CELERY_BROKER_URL"},
                "backend": {"env": "CELERY_BACKEND_URL"},
                "include": ["craftflow_migrations.celery_app"],
            },
            name="celery",
        )
    return dg.multiprocess_executor


def executor_run_config(max_concurrent: int, tag_limits: list[dict] | None = None) -> dict:
    """The executor part of the import's default run config."""
    if executor_kind() == "celery":
        return {}
    config: dict = {
        "max_concurrent": max_concurrent,
        # Steps fork from a server that has already imported the project,
        # so a batch step starts in milliseconds instead of seconds.
        "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}},
    }
    if tag_limits:
        config["tag_concurrency_limits"] = tag_limits
    return {"execution": {"config": config}}
