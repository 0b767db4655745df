"""What the multiprocess executor's forkserver imports once, so each step starts in milliseconds.

A step process forked from the server still has to open the Dagster instance, and that
imports the storage layer (event log, run storage, alembic: about 0.45 s). Importing
the storage modules of the configured instance here, before any fork, makes that free.
Imports only: no connections are opened before the fork.
"""

from __future__ import annotations

import importlib
import os

import scipy.fftpack  # noqa: F401  (imagehash.phash imports it on its first call: 0.2 CPU-s per step)

import craftflow_migrations.definitions  # noqa: F401  (the code every step runs)
from craftflow_migrations.settings import get_settings


def _storage_modules() -> set[str]:
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import ConfigurableClassData

    modules = {"dagster._core.storage.event_log", "dagster._core.storage.runs",
               "dagster._core.storage.schedules", "dagster._core.storage.legacy_storage"}
    home = get_settings().dagster_home
    if home and os.path.isdir(home):
        try:
            ref = InstanceRef.from_dir(home)
        except Exception:  # noqa: BLE001  (a bad dagster.yaml is reported when the run opens it)
            return modules
        modules.update(v.module_name for v in ref if isinstance(v, ConfigurableClassData))
    return modules


def _import_storage() -> None:
    for name in sorted(_storage_modules()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the instance fails with its own message when it is opened


_import_storage()
