"""Run the service's modes as Dagster runs on an instance, so they show up in the UI.

``MIGRATION_MODE=all``: startup job, then the NAS import of every new or changed
<shop>/<template> partition, then complex migrations. Each run is a real Dagster run
(``execute_job``); the import covers its partitions in one run (a partition range), its
batches hashed in parallel by the multiprocess executor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text

from .db import get_engine
from .long_lived import long_lived
from .nas.clients import NasError
from .settings import get_settings

if TYPE_CHECKING:
    # Dagster is imported only when a run starts: a re-run of an unchanged NAS never needs it.
    import dagster as dg

    from .nas.listing import SavedListing

log = logging.getLogger("craftflow_migrations.worker")


@dataclass
class RunOutcome:
    job: str
    run_id: str
    success: bool
    partition: str | None = None
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metadata: dict[str, dict] = field(default_factory=dict)  # step outputs' metadata by step key
    materializations: dict[str | None, dict] = field(default_factory=dict)  # metadata by partition
    unchanged: bool = False  # not run: the folder's listing matched its last import

    @property
    def import_summary(self) -> dict:
        """This partition's NAS import metadata (empty for other jobs or failed runs)."""
        return self.materializations.get(self.partition, {})


LOG_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _execute(factory: Callable[[], dg.JobDefinition], instance: dg.DagsterInstance,
             tags: dict[str, str] | None = None, run_config: dict | None = None) -> RunOutcome:
    import dagster as dg

    from .nas.partitions import plain_metadata

    run_config = {**LOG_CONFIG, **(run_config or {})}
    with dg.execute_job(dg.reconstructable(factory), instance, tags=tags, run_config=run_config) as result:
        outcome = RunOutcome(result.job_def.name, result.run_id, result.success,
                             partition=(tags or {}).get("dagster/partition"))
        for event in result.all_events:
            if event.is_step_failure:
                data = event.step_failure_data
                message = (data.user_failure_data.description if data.user_failure_data and
                           data.user_failure_data.description else data.error.message.strip() if data.error else "")
                outcome.failures.append(f"{event.step_key}: {message.splitlines()[0] if message else 'failed'}")
            elif event.is_successful_output:
                outcome.metadata[event.step_key] = plain_metadata(event.step_output_data.metadata)
            elif event.is_step_materialization:
                mat = event.step_materialization_data.materialization
                outcome.materializations[mat.partition] = plain_metadata(mat.metadata)
        started = {e.step_key for e in result.all_events if e.is_step_start}
        if not result.success:
            # Dagster abandons the dependents of a failed step without a step event.
            outcome.skipped = sorted(
                n.name for n in result.job_def.nodes
                if not any(k == n.name or k.startswith(f"{n.name}.") or k.startswith(f"{n.name}[") for k in started)
            )
        if not result.success and not outcome.failures:
            outcome.failures.append("run failed before any step ran (see the run in the Dagster UI)")
    return outcome


def run_startup(instance: dg.DagsterInstance) -> RunOutcome:
    from .definitions import startup_job_factory

    return _execute(startup_job_factory, instance)


def run_complex(instance: dg.DagsterInstance) -> RunOutcome:
    from .definitions import complex_migrations_job_factory

    return _execute(complex_migrations_job_factory, instance)


def run_duplicates(instance: dg.DagsterInstance) -> RunOutcome:
    from .definitions import duplicates_job_factory

    return _execute(duplicates_job_factory, instance)


def applied_in_run(database_url: str, run_id: str) -> list[str]:
    with get_engine(database_url).connect() as conn:
        return list(conn.execute(
            text("SELECT name FROM craftflow_schema_migrations WHERE dagster_run_id = :r ORDER BY applied_at"),
            {"r": run_id},
        ).scalars())


def duplicates_pending(database_url: str) -> bool:
    """Whether any image changed since duplicates were last grouped (one indexed look-up)."""
    from .nas import store

    with get_engine(database_url).connect() as conn:
        return store.duplicates_pending(conn)


def unchanged_since_last_import(listing: SavedListing) -> list[RunOutcome] | None:
    """An outcome per folder when every listed folder matches its last complete import, else None.

    One query against ``nas_partition_state``, no Dagster: the worker imports Dagster and
    opens its instance only when there is something to import.
    """
    from .nas import store

    fingerprints = {key: li.fingerprint for key, li in listing.partitions.items()}
    with get_engine(get_settings().require_database_url()).connect() as conn:
        saved = store.saved_fingerprints(conn, list(fingerprints))
    if not fingerprints or saved != fingerprints:
        return None
    return [RunOutcome("nas_import", "-", True, partition=key, unchanged=True) for key in fingerprints]


class NasNotConfigured(RuntimeError):
    pass


def scan_nas(keys: Sequence[str] | None = None):
    """Every partition on the NAS (or ``keys``), listed over one connection, with when it began."""
    from .nas import store
    from .nas.clients import open_client
    from .nas.listing import SavedListing, list_nas

    settings = get_settings()
    missing = settings.nas.missing()
    if missing:
        raise NasNotConfigured(f"set {', '.join(missing)}")
    with get_engine(settings.require_database_url()).connect() as conn:
        listed_at = store.db_now(conn)
    # The listing is kept for the whole run (the worker's diff, the plan step's file).
    with open_client(settings.nas) as client, long_lived():
        listings, _ = list_nas(client, keys, log)
    return SavedListing(listed_at, listings)


def register_partitions(instance: dg.DagsterInstance, keys: Sequence[str]) -> None:
    from .nas.partitions import PARTITIONS_NAME

    known = set(instance.get_dynamic_partitions(PARTITIONS_NAME))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(PARTITIONS_NAME, new)


def warm_step_processes(run_config: dict | None = None) -> None:
    """Start the multiprocess executor's forkserver now, if the import's run will use it.

    Its imports take about a second; started as soon as a run is certain they overlap the
    worker's own start (or, in ``MIGRATION_MODE=all``, the whole startup job) instead of
    delaying the first step. Idempotent: the executor reuses a running server. The default
    run config is decided without importing the job (Dagster), so this can run first.
    """
    from .forkserver import start_forkserver

    if run_config is None:
        if get_settings().executor != "celery":
            start_forkserver()
        return
    config = run_config.get("execution", {}).get("config", {})
    if "forkserver" in config.get("start_method", {}):
        start_forkserver()


def run_nas_import(instance: dg.DagsterInstance, partitions: Sequence[str] | None = None,
                   shop: str | None = None, extra_tags: dict[str, str] | None = None,
                   run_config: dict | None = None, force: bool = False,
                   listing: SavedListing | None = None, duplicates_next: bool = False) -> list[RunOutcome]:
    """Import all partitions, the given ones, or every template of ``shop``: one outcome each.

    Partitions whose listing is unchanged since their last materialization are not run
    again (``force`` runs them anyway): a re-deploy costs one listing per folder. The rest
    go in as few runs as possible, one per contiguous range of partitions (usually one),
    because each run and each of its steps has a start-up cost; parallelism is inside the
    run, across batch steps. Runs are never started from threads: ``execute_job``'s
    logging deadlocks there. ``duplicates_next``: the caller runs the duplicates next, in this
    process, so their libraries load before the run, while the step forkserver still imports.
    """
    from .nas.listing import LISTING_TAG, SavedListing, save_listing
    from .nas.names import split_partition_key
    from .nas.partitions import PARTITIONS_NAME, partitions_to_import
    from .nas.ranges import contiguous_ranges, partition_tags

    listing = listing or scan_nas(partitions)
    fingerprints = {key: li.fingerprint for key, li in listing.partitions.items()}
    keys = list(fingerprints)
    register_partitions(instance, keys)  # every folder seen becomes a partition, selected or not
    if shop is not None:
        keys = [k for k in keys if split_partition_key(k)[0] == shop]
    order = instance.get_dynamic_partitions(PARTITIONS_NAME)
    todo = set(partitions_to_import(instance, {k: fingerprints[k] for k in keys}, order, force=force,
                                    skip_in_flight=False))
    outcomes: dict[str, RunOutcome] = {
        key: RunOutcome("nas_import", "-", True, partition=key, unchanged=True) for key in keys if key not in todo}
    if outcomes:
        # Folders Dagster knows as imported (before nas_partition_state existed, or a state
        # row lost): recorded, so the next unchanged run needs no Dagster at all.
        from .nas import store

        with get_engine(get_settings().require_database_url()).begin() as conn:
            store.save_fingerprints(conn, {key: fingerprints[key] for key in outcomes})
    if todo:
        # An unchanged NAS imports none of the job's code and starts no step processes at all.
        with long_lived():
            from .definitions import nas_import_job_factory, nas_import_run_config

        warm_step_processes(run_config)
    if todo and duplicates_next:
        # Free here: the run's first step waits for the step forkserver's imports (started
        # before the instance was opened) about as long. After the run they were 0.2-0.6 s
        # of the serial stretch before the duplicates run.
        from .duplicates import load_libraries

        load_libraries()
    for group in contiguous_ranges(sorted(todo), order):
        tags = {**partition_tags(group), **(extra_tags or {})}
        # The run's plan step reads this listing instead of listing the NAS a second time.
        saved = save_listing(Path(instance.root_directory) / "storage" / "listings",
                             SavedListing(listing.listed_at, {k: listing.partitions[k] for k in group}))
        try:
            run = _execute(nas_import_job_factory, instance, tags={**tags, LISTING_TAG: str(saved)},
                           run_config=run_config or nas_import_run_config())
        finally:
            saved.unlink(missing_ok=True)
        for key in group:
            outcomes[key] = RunOutcome(run.job, run.run_id, run.success, partition=key, failures=run.failures,
                                       skipped=run.skipped, materializations=run.materializations)
    return [outcomes[k] for k in keys]


__all__ = ["NasError", "NasNotConfigured", "RunOutcome", "applied_in_run",
           "run_complex", "run_nas_import", "run_startup", "scan_nas", "unchanged_since_last_import"]
