"""What Dagster knows of each <shop>/<template> partition: last import, runs in flight.

The worker and the scan sensor decide what to import the same way: a partition whose
listing fingerprint differs from the one on its latest materialization, and that no queued
or running import already covers. A failed run leaves no materialization, so its folder is
requested again on the next tick instead of waiting for the folder to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dagster as dg

from .ranges import RANGE_END_TAG, RANGE_START_TAG

DESIGN_IMAGES = dg.AssetKey("design_images")
NAS_IMPORT_JOB = "nas_import"
PARTITIONS_NAME = "nas_shop_templates"  # the DynamicPartitionsDefinition's name (assets.py)
SFTP_POOL = "nas_sftp"  # batch steps each hold one SFTP connection

_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]


def follow_configured_concurrency(instance: dg.DagsterInstance, limit: int) -> None:
    """The ``nas_sftp`` pool's limit is NAS_MAX_CONCURRENT: one setting for SFTP connections.

    Left at the instance's ``default_limit`` (4 in the shipped dagster.yaml), the pool held
    batch steps to it whatever NAS_MAX_CONCURRENT said: 16 cores ran 4 batch steps at once.
    The plan step sets it on every import, however launched (worker, UI, backfill, sensor),
    before any batch step claims a slot.
    """
    if instance.event_log_storage.supports_global_concurrency_limits:
        info = instance.event_log_storage.get_concurrency_info(SFTP_POOL)
        if info.slot_count != limit:
            instance.event_log_storage.set_concurrency_slots(SFTP_POOL, limit)


def plain_metadata(metadata: Mapping) -> dict:
    """Metadata values without their Dagster wrappers (``MetadataValue.value``)."""
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def last_fingerprints(instance: dg.DagsterInstance, keys: Sequence[str]) -> dict[str, str]:
    """Listing fingerprint of each partition's latest materialization (absent: never imported).

    Two queries whatever the number of folders (a query per partition took minutes at tens
    of thousands): the latest materialization's storage id per partition, then those records.
    """
    latest = instance.get_latest_storage_id_by_partition(DESIGN_IMAGES, dg.DagsterEventType.ASSET_MATERIALIZATION,
                                                         set(keys))
    ids = sorted(latest.values())
    out: dict[str, str] = {}
    for start in range(0, len(ids), 1000):  # SQLite caps the variables of one statement
        chunk = ids[start:start + 1000]
        records = instance.fetch_materializations(dg.AssetRecordsFilter(DESIGN_IMAGES, storage_ids=chunk),
                                                  limit=len(chunk)).records
        for record in records:
            mat = record.asset_materialization
            fingerprint = plain_metadata(mat.metadata).get("listing_fingerprint")
            if mat.partition is not None and fingerprint:
                out[mat.partition] = fingerprint
    return out


def partitions_in_flight(instance: dg.DagsterInstance, order: Sequence[str]) -> set[str]:
    """Partitions that a queued or running import already covers (single keys and ranges)."""
    position = {k: i for i, k in enumerate(order)}
    out: set[str] = set()
    for run in instance.get_runs(dg.RunsFilter(job_name=NAS_IMPORT_JOB, statuses=_IN_FLIGHT)):
        tags = run.tags
        if "dagster/partition" in tags:
            out.add(tags["dagster/partition"])
        elif tags.get(RANGE_START_TAG) in position and tags.get(RANGE_END_TAG) in position:
            out.update(order[position[tags[RANGE_START_TAG]]:position[tags[RANGE_END_TAG]] + 1])
    return out


def partitions_to_import(instance: dg.DagsterInstance, fingerprints: Mapping[str, str], order: Sequence[str],
                         force: bool = False, skip_in_flight: bool = True) -> list[str]:
    """New or changed partitions (all of them with ``force``), less those already being imported.

    The sensor skips partitions with a queued or running import (the daemon's run monitoring
    fails runs whose process died). The one-shot worker does not: a worker killed with -9
    leaves its run marked STARTED forever, and two imports of one folder at once are safe
    anyway (the newer listing wins, ``store.py``).
    """
    busy = partitions_in_flight(instance, order) if skip_in_flight else set()
    previous = {} if force else last_fingerprints(instance, list(fingerprints))
    return [k for k, fp in fingerprints.items() if previous.get(k) != fp and k not in busy]
