"""What the multiprocess executor's forkserver imports once, so each step starts in milliseconds.

A step process forked from the server still has to open the Dagster instance, and that
imports the storage layer (event log, run storage, alembic: about 0.45 s). Importing
the storage modules of the configured instance here, before any fork, makes that free.
Imports only: no connections are opened before the fork.
"""

from __future__ import annotations

import importlib
import os

from craftflow_migrations.long_lived import long_lived


def _storage_modules() -> set[str]:
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import ConfigurableClassData

    from craftflow_migrations.settings import get_settings

    # Opening any instance also builds its secrets loader and its defs-state storage, and its
    # SQLite storages check their schema version.
    modules = {"dagster._core.storage.event_log", "dagster._core.storage.runs",
               "dagster._core.storage.schedules", "dagster._core.storage.legacy_storage",
               "dagster._core.storage.migration.utils", "dagster._core.instance.factory",
               "dagster._core.secrets.env_file", "dagster._core.storage.defs_state.blob_storage_state_storage"}
    home = get_settings().dagster_home
    if home and os.path.isdir(home):
        try:
            ref = InstanceRef.from_dir(home)
        except Exception:  # noqa: BLE001  (a bad dagster.yaml is reported when the run opens it)
            return modules
        modules.update(v.module_name for v in ref if isinstance(v, ConfigurableClassData))
    return modules


def _import_storage() -> None:
    from craftflow_migrations.instance import read_storage_scripts

    for name in sorted(_storage_modules()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the instance fails with its own message when it is opened
    read_storage_scripts()


def _import_path_library() -> None:
    """universal_pathlib and fsspec, which the instance's defs-state storage builds a path with.

    Both load their modules on first use: one local path object (nothing is opened) brings in
    what every step process otherwise imported on opening the instance (0.03-0.05 CPU-s each).
    """
    from upath import UPath

    UPath(os.getcwd())


def _preload() -> None:
    """Import what every step needs, without collecting garbage meanwhile.

    All of it lives as long as the steps do, so collecting it is wasted work: its full
    collections cost the server 0.1-0.3 CPU-s, while the worker imports the same code on the
    other core. Frozen afterwards, it is never traversed by a step's full collections either
    (each walked all of Dagster's objects: 0.08-0.2 CPU-s a step), and its pages stay shared
    with the server: Python's advice for processes forked without exec.
    """
    with long_lived():
        # The pHash of a flat or mirrored design takes imagehash's arithmetic, scipy.fftpack,
        # which would otherwise be imported in a step on its first such file: 0.2 CPU-s.
        importlib.import_module("scipy.fftpack")
        importlib.import_module("craftflow_migrations.definitions")  # the code every step runs
        _import_storage()
        _import_path_library()


_preload()
