"""Dagster's SQLite event log, writing a batch of asset events at once (named in dagster.yaml)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import sqlalchemy as db
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._serdes import ConfigurableClassData


class BatchingSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, with ``store_event_batch`` writing a batch at once.

    Dagster hands batches of asset events to ``store_event_batch`` when
    ``DAGSTER_EVENT_BATCH_SIZE`` is set (the worker sets it): a run over a range of 3,000
    folders plans and materializes 3,000 partitions. The SQLite storage stores them one by
    one, each with two connections and two commits (15 s of the worker's time for 3,000
    folders, and as much in the summary step); here each batch is one multi-row insert into
    the run's shard and one transaction in the index shard, with exactly the rows
    ``store_event`` writes, each event serialized once. ``base_dir`` is DAGSTER_HOME; run
    shards live in ``history/runs``.
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
        # Serialized once for both shards (``prepare_insert_event*`` serialize each event again:
        # a third of the summary step's time for 3,000 folders); one compiled statement each.
        rows = [self._event_to_row(e) for e in events]
        insert = SqlEventLogStorageTable.insert()
        for run_id in dict.fromkeys(e.run_id for e in events):
            with self.run_connection(run_id) as conn:
                conn.execute(insert, [row for row in rows if row["run_id"] == run_id])
        with self.index_transaction() as conn:
            # The rows' ids without a statement per row (45 µs an event; RETURNING in the rows'
            # order is one statement per row here too): from its first insert this transaction
            # holds SQLite's write lock, and a rowid is one more than the largest, so the
            # batch's ids are the largest id's predecessors, in order.
            conn.execute(insert, rows)
            last = conn.execute(db.select(db.func.max(SqlEventLogStorageTable.c.id))).scalar_one()
            ids = list(range(last - len(rows) + 1, last + 1))
            self._store_asset_event_tags(conn, list(events), ids)
            for event, event_id in latest_per_asset_and_kind(events, ids):
                self._store_asset_event(conn, event, event_id)


def latest_per_asset_and_kind(events: Sequence[EventLogEntry], ids: Sequence[int]) -> list[tuple[EventLogEntry, int]]:
    """The events whose asset-key row writes survive the batch, in storage order.

    ``_store_asset_event`` overwrites one row per asset key with a fixed set of columns for
    each kind of event (materialization, planned, observation), so within a batch only the
    last event of each kind for each key leaves a trace. 3,000 partitions of one asset were
    3,000 rewrites of that row, each serializing its event a second time and reflecting the
    table's columns: a third of the summary step.
    """
    last: dict[tuple[str, object], tuple[EventLogEntry, int]] = {}
    for event, event_id in zip(events, ids, strict=True):
        dagster_event = event.dagster_event
        if dagster_event is not None and dagster_event.asset_key is not None:
            last[(dagster_event.asset_key.to_string(), dagster_event.event_type_value)] = (event, event_id)
    return sorted(last.values(), key=lambda pair: pair[1])
