"""The Dagster instance the worker records its runs in."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._serdes import ConfigurableClassData

from .settings import get_settings, set_dagster_home

LOCAL_HOME = Path.home() / ".craftflow_migrations" / "dagster_home"
# A local instance needs no server: SQLite storage under DAGSTER_HOME, plus the SFTP pool.
LOCAL_DAGSTER_YAML = """\
# Written by craftflow-migrate for local use; production uses the repository's dagster.yaml.
telemetry:
  enabled: false
# SQLite event log that writes a batch of events (a run's thousands of per-partition
# materializations) in two transactions instead of two per event.
event_log_storage:
  module: craftflow_migrations.instance
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


class BatchingSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, with ``store_event_batch`` writing a batch at once.

    Dagster hands batches of asset events to ``store_event_batch`` when
    ``DAGSTER_EVENT_BATCH_SIZE`` is set (the worker sets it): a run over a range of 3,000
    folders plans and materializes 3,000 partitions. The SQLite storage stores them one by
    one, each with two connections and two commits (15 s of the worker's time for 3,000
    folders, and as much in the summary step); here each batch is one multi-row insert into
    the run's shard and one transaction in the index shard, with exactly the rows
    ``store_event`` writes. ``base_dir`` is DAGSTER_HOME; run shards live in ``history/runs``.
    """

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(os.path.join(base_dir, "history", "runs"), inst_data)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: dict):
        return cls(inst_data=inst_data, **config_value)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        asset = [e for e in events if e.is_dagster_event and e.dagster_event_type in ASSET_EVENTS]
        if len(asset) != len(events):  # anything but plain asset events: Dagster's own path
            super().store_event_batch(events)
            return
        for run_id in dict.fromkeys(e.run_id for e in events):
            with self.run_connection(run_id) as conn:
                conn.execute(self.prepare_insert_event_batch([e for e in events if e.run_id == run_id]))
        with self.index_transaction() as conn:
            ids = [conn.execute(self.prepare_insert_event(e)).inserted_primary_key[0] for e in events]
            self._store_asset_event_tags(conn, list(events), ids)
            for event, event_id in zip(events, ids, strict=True):
                self._store_asset_event(conn, event, event_id)


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
