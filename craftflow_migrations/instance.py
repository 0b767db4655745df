"""The Dagster instance the worker records its runs in (Dagster is imported only when one is needed)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import get_settings, set_dagster_home

if TYPE_CHECKING:
    import dagster as dg

LOCAL_HOME = Path.home() / ".craftflow_migrations" / "dagster_home"
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
    # The worker sets nas_sftp's own limit to NAS_MAX_CONCURRENT before each import.
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
    path = Path(home) if home else LOCAL_HOME
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_DAGSTER_YAML)
    set_dagster_home(path)
    return path


def get_instance() -> dg.DagsterInstance:
    """The instance, with its storage created under a file lock.

    Two workers starting at once on a fresh SQLite-backed DAGSTER_HOME would both create
    its tables ("table runs already exists"); PostgreSQL storage is unaffected.
    """
    import dagster as dg

    home = ensure_dagster_home()
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
