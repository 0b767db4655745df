"""The Dagster instance the worker records its runs in (Dagster is imported only when one is needed)."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .long_lived import long_lived
from .settings import LOCAL_DAGSTER_HOME, get_settings, set_dagster_home

if TYPE_CHECKING:
    import dagster as dg

# A local instance needs no server: SQLite storage under DAGSTER_HOME, plus the SFTP pool.
LOCAL_DAGSTER_YAML = """\
# Written by craftflow-migrate for local use; production uses the repository's dagster.yaml.
telemetry:
  enabled: false
# SQLite event log that writes a batch of events (a run's thousands of per-partition
# materializations) in two transactions instead of two per event.
event_log_storage:
  module: craftflow_migrations.event_log
  class: BatchingSqliteEventLogStorage
  config:
    base_dir:
      env: DAGSTER_HOME
python_logs:
  # Migration files log with logging.getLogger(__name__); these loggers reach the event log.
  managed_python_loggers: [craftflow_migrations]
  python_log_level: INFO
concurrency:
  pools:
    # Every import's plan step sets nas_sftp's own limit to NAS_MAX_CONCURRENT.
    default_limit: 4
run_retries:
  enabled: true
  max_retries: 0
"""


def __getattr__(name: str):
    # dagster.yaml files written before the storage moved to event_log.py name it here.
    if name == "BatchingSqliteEventLogStorage":
        from .event_log import BatchingSqliteEventLogStorage

        return BatchingSqliteEventLogStorage
    raise AttributeError(name)


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, or a local default created on first use."""
    home = get_settings().dagster_home
    path = Path(home) if home else LOCAL_DAGSTER_HOME
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_DAGSTER_YAML)
    set_dagster_home(path)
    return path


def reuse_storage_scripts() -> None:
    """Read each of Dagster's alembic script folders once per process, not on every open.

    Opening a SQLite-backed instance checks each storage's schema against its newest alembic
    revision, and alembic finds that by executing every revision file of the storage (about
    90): 0.05 CPU-s a storage, and a step process opens four (the runs, the schedules, the
    event log's index and the run's own shard), 0.2 CPU-s a step before its op starts. The
    scripts are the installed Dagster's and do not change while a process runs. Called in the
    worker and in the step forkserver, whose steps inherit the folders already read.
    """
    from alembic.script import ScriptDirectory

    if getattr(ScriptDirectory.from_config, "reused", False):
        return
    read = ScriptDirectory.from_config.__func__
    folders: dict[tuple, ScriptDirectory] = {}

    def from_config(cls, config):
        # Everything a script folder is read with (its location, version locations, file
        # template), resolved; not the folder of the .ini that named it.
        options = config.get_section(config.config_ini_section, {})
        key = (cls, tuple(sorted((k, v) for k, v in options.items() if k != "here")))
        if key not in folders:
            folders[key] = read(cls, config)
        return folders[key]

    from_config.reused = True
    ScriptDirectory.from_config = classmethod(from_config)


def read_storage_scripts() -> None:
    """Read now the alembic folder of every Dagster storage module imported so far.

    For the step forkserver: each step it forks starts with them read (its own
    :func:`reuse_storage_scripts` cache), instead of reading them again on opening the
    instance. Reads files only; no storage is opened.
    """
    from alembic.script import ScriptDirectory
    from dagster._core.storage.sql import get_alembic_config

    reuse_storage_scripts()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if (file and module.__name__.startswith(("dagster.", "dagster_"))
                and os.path.isfile(os.path.join(os.path.dirname(file), "alembic", "alembic.ini"))):
            ScriptDirectory.from_config(get_alembic_config(file)).as_revision_number("head")


def get_instance() -> dg.DagsterInstance:
    """The instance, with its storage created under a file lock.

    Two workers starting at once on a fresh SQLite-backed DAGSTER_HOME would both create
    its tables ("table runs already exists"); PostgreSQL storage is unaffected.
    """
    with long_lived():  # Dagster's modules and the instance last as long as the process
        import dagster as dg

        home = ensure_dagster_home()
        reuse_storage_scripts()
        with open(home / ".craftflow-init.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                instance = dg.DagsterInstance.get()
                instance.get_runs(limit=1)
                instance.get_dynamic_partitions("nas_shop_templates")
                instance.all_instigator_state()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return instance
