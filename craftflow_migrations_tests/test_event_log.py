"""The batching event log leaves exactly what Dagster's own SQLite event log leaves.

The same events (plans and materializations of many partitions of two assets, over two
runs) go into Dagster's stock storage one by one and into ours as batches; every query the
UI and the sensors use answers the same.
"""

from __future__ import annotations

import logging
import time

import dagster as dg
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventType,
    StepMaterializationData,
)
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from craftflow_migrations.event_log import BatchingSqliteEventLogStorage

ASSETS = [dg.AssetKey("design_images"), dg.AssetKey("design_duplicates")]


def entry(run_id: str, event: DagsterEvent, at: float) -> EventLogEntry:
    return EventLogEntry(error_info=None, level=logging.INFO, user_message="", run_id=run_id, timestamp=at,
                         step_key=event.step_key, job_name="nas_import", dagster_event=event)


def planned(run_id: str, key: dg.AssetKey, partition: str, at: float) -> EventLogEntry:
    return entry(run_id, DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value, "nas_import",
                                      event_specific_data=AssetMaterializationPlannedData(key, partition=partition)), at)


def materialized(run_id: str, key: dg.AssetKey, partition: str, files: int, at: float) -> EventLogEntry:
    materialization = dg.AssetMaterialization(key, partition=partition, metadata={"files_imported": files})
    return entry(run_id, DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, "nas_import", step_key="summary",
                                      event_specific_data=StepMaterializationData(materialization)), at)


def runs_of_events() -> list[list[EventLogEntry]]:
    """Two runs: each plans every partition of both assets, then materializes most of them."""
    at = time.time() - 100
    batches = []
    for run, run_id in enumerate(["run-one", "run-two"]):
        for key in ASSETS:
            parts = [f"Shop {i // 7}|Template {i}" for i in range(40)]
            batches.append([planned(run_id, key, p, at + i * 0.001) for i, p in enumerate(parts)])
            batches.append([materialized(run_id, key, p, run * 100 + i, at + 1 + i * 0.001)
                            for i, p in enumerate(parts) if (i + run) % 5])
            at += 10
    return batches


def answers(storage) -> dict:
    out = {}
    for key in ASSETS:
        record = storage.get_asset_records([key])[0]
        entry = record.asset_entry
        last = entry.last_materialization_record
        out[key.to_string()] = {
            "last_materialization": (last.storage_id, last.event_log_entry.run_id,
                                     last.event_log_entry.dagster_event.partition),
            "last_run_id": entry.last_run_id,
            "materialized": sorted(storage.get_materialized_partitions(key)),
            "latest_by_partition": storage.get_latest_storage_id_by_partition(
                key, DagsterEventType.ASSET_MATERIALIZATION),
            "planned_by_partition": storage.get_latest_storage_id_by_partition(
                key, DagsterEventType.ASSET_MATERIALIZATION_PLANNED),
            "files": sorted((r.event_log_entry.dagster_event.partition,
                             r.asset_materialization.metadata["files_imported"].value)
                            for r in storage.fetch_materializations(key, limit=1000).records),
        }
    return out


def test_batched_asset_events_leave_what_one_by_one_storage_leaves(tmp_path):
    stock = SqliteEventLogStorage(str(tmp_path / "stock"))
    batching = BatchingSqliteEventLogStorage(str(tmp_path / "batching"))
    for batch in runs_of_events():
        for event in batch:
            stock.store_event(event)
        batching.store_event_batch(batch)
    assert answers(batching) == answers(stock)
    for run_id in ("run-one", "run-two"):
        assert ([r.event_log_entry.dagster_event.partition for r in batching.get_records_for_run(run_id).records]
                == [r.event_log_entry.dagster_event.partition for r in stock.get_records_for_run(run_id).records])
