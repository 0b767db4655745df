"""The ``design_images`` asset: one partition per <shop>/<template> folder on the NAS.

Graph-backed: ``plan_nas_batches`` lists the run's folders (one partition, or a range of
them in a single-run backfill), diffs them against the table and yields one dynamic
output per ~500 MB batch; ``import_nas_batch`` steps are mapped over them (in parallel
under the multiprocess executor) and ``summarize_nas_import`` writes one materialization
per partition with its own counts.
"""

import time
from dataclasses import dataclass, replace
from datetime import datetime

import dagster as dg

from ..resources import PostgresResource
from ..schema import runner
from ..schema.discovery import discover
from ..settings import migrations_dir
from . import store
from .batching import MB, plan_batches
from .changes import PartitionScan, scan_for_import
from .clients import NasError
from .importer import Counts, import_batch, sum_counts
from .listing import LISTING_TAG, NasFile, list_nas, load_listing
from .names import shown
from .partitions import PARTITIONS_NAME, SFTP_POOL, follow_configured_concurrency
from .resource import NasResource
from .thumbnail_packs import ThumbnailStoreError


@dataclass(frozen=True)
class BatchPlan:
    """One batch step's work: the files, and when the listing they came from began."""

    index: int
    count: int
    sequential: bool
    listed_at: datetime
    files: list[NasFile]
    had_rows: frozenset[str] = frozenset()  # paths of files that had a row when the run was planned


@dataclass(frozen=True)
class BatchCounts:
    """What one batch step hands the summary step: its counts for each partition it touched."""

    partitions: dict[str, Counts]


@dataclass(frozen=True)
class RunPlan:
    started: float
    batches: int
    partitions: dict[str, PartitionScan]  # without their file lists: the batches carry those


nas_partitions = dg.DynamicPartitionsDefinition(name=PARTITIONS_NAME)
# Caps parallel batch steps through the executor's tag_concurrency_limits (definitions.py).
BATCH_STEP_TAG = ("craftflow/step", "nas-batch")


class NasImportConfig(dg.Config):
    batch_size_mb: int = 500
    parallel_batches: int = 2
    min_batch_mb: int = 32


def pending_startup_migrations(engine) -> list[str]:
    """What stands between the database and the schema head: file problems, then pending names."""
    plan = discover(migrations_dir())
    return plan.errors + runner.pending(engine, plan.of_kind("startup"))


def schema_gate(engine) -> None:
    """Refuse to import into an old schema."""
    missing = pending_startup_migrations(engine)
    if missing:
        raise dg.Failure(
            description=(
                f"Schema is not at head: pending startup migrations {', '.join(missing)}; "
                "run the startup job (craftflow-migrate with MIGRATION_MODE=startup) first"
            )
        )


@dg.op(
    out={"batches": dg.DynamicOut(BatchPlan), "scan": dg.Out(RunPlan)},
    required_resource_keys={"postgres", "nas"},
    tags={"kind": "nas"},
)
def plan_nas_batches(context: dg.OpExecutionContext, config: NasImportConfig):
    """List every partition of the run, diff it, and cut what changed into balanced batches."""
    postgres: PostgresResource = context.resources.postgres
    nas: NasResource = context.resources.nas
    keys = list(context.partition_keys)
    schema_gate(postgres.engine)
    if nas.missing():
        raise dg.Failure(description=f"NAS credentials not configured: set {', '.join(nas.missing())}")
    follow_configured_concurrency(context.instance, nas.settings.max_concurrent)
    started = time.monotonic()
    # A run the worker started names the listing it made (listed once per run); a run from the
    # UI, a sensor or a backfill lists its folders here.
    saved = load_listing(context.run.tags.get(LISTING_TAG), keys)
    if saved is not None:
        listed_at, listings = saved.listed_at, saved.partitions
    else:
        with postgres.engine.connect() as conn:
            listed_at = store.db_now(conn)
        try:
            with nas.open() as client:
                listings, _ = list_nas(client, keys, context.log)
        except NasError as exc:
            raise dg.Failure(description=str(exc)) from None
    scans = scan_for_import(listings, postgres.engine, listed_at, nas.settings.max_file_mb * MB)
    to_import = [f for scan in scans for f in scan.to_import]
    had_rows = {path for scan in scans for path in scan.had_rows}
    if nas.batched:
        # Batches are cut across all partitions of the run, so a run of many small folders
        # still makes a few large steps that keep every core busy.
        batches = plan_batches(to_import, config.batch_size_mb * MB, config.parallel_batches,
                               config.min_batch_mb * MB)
    else:
        batches = [to_import] if to_import else []
    problems = [p for scan in scans for p in scan.problems]
    for line in problems[:20]:
        context.log.warning(f"NAS listing: {line}")
    context.log.info(
        f"{len(keys)} partition(s) on {nas.description} "
        f"{'listed by the worker' if saved else 'listed'}, diffed in {time.monotonic() - started:.2f}s: "
        f"{sum(s.seen for s in scans)} files, {sum(s.unchanged for s in scans)} unchanged, "
        f"{len(to_import)} to import ({sum(f.size for f in to_import) / MB:,.1f} MB) in {len(batches)} batch(es), "
        f"{sum(s.removed for s in scans)} removed, {sum(s.skipped for s in scans)} over the size cap, "
        f"{len(problems)} entries recorded as problems"
    )
    yield dg.Output(
        RunPlan(time.time(), len(batches), {s.key: replace(s, to_import=[], had_rows=set()) for s in scans}),
        output_name="scan",
    )
    for i, batch in enumerate(batches):
        plan = BatchPlan(i + 1, len(batches), not nas.batched, listed_at, batch,
                         frozenset(f.path for f in batch if f.path in had_rows) if had_rows else frozenset())
        yield dg.DynamicOutput(plan, mapping_key=f"batch_{i + 1:04d}", output_name="batches")


def _batch_label(context: dg.OpExecutionContext, batch: BatchPlan) -> str:
    keys = context.partition_keys
    where = shown(keys[0]) if len(keys) == 1 else f"{len(keys)} partitions"
    return f"{where} batch {batch.index}/{batch.count}"


@dg.op(
    required_resource_keys={"postgres", "nas"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS),
    pool=SFTP_POOL,
    tags={"kind": "nas", BATCH_STEP_TAG[0]: BATCH_STEP_TAG[1]},
)
def import_nas_batch(context: dg.OpExecutionContext, batch: BatchPlan) -> BatchCounts:
    """Fetch and hash one batch; bad files are recorded, a lost connection retries the batch."""
    postgres: PostgresResource = context.resources.postgres
    nas: NasResource = context.resources.nas
    label = _batch_label(context, batch)
    if context.retry_number:
        context.log.warning(f"{label}: attempt {context.retry_number + 1} of 3")
    # An earlier attempt (a retry, or the run this one re-executes) may have committed part of
    # the batch: then the database is asked, and what it committed is skipped.
    first_attempt = not context.retry_number and context.run.parent_run_id is None
    try:
        with nas.open() as client:
            result = import_batch(client, postgres.engine, batch.files, batch.listed_at, nas.settings, label,
                                  context.log, pipelined=not batch.sequential,
                                  had_rows=batch.had_rows if first_attempt else None)
    except (NasError, ThumbnailStoreError) as exc:
        # Retried by the RetryPolicy; the message is the one line an operator needs.
        raise dg.Failure(description=str(exc), allow_retries=True) from None
    total = result.total
    context.log.info(
        f"{label} done: {total.imported} imported, {total.failed} failed, {total.skipped} already done, "
        f"{total.bytes_read / MB:,.1f} MB at {result.mb_per_s:,.1f} MB/s"
    )
    return BatchCounts(result.partitions)


def add_partition_metadata(context: dg.AssetExecutionContext, metadata_by_key: dict[str, dict]) -> None:
    """``context.add_asset_metadata(metadata, partition_key=key)`` for every key, in linear time.

    Dagster's own call checks each key by loading every dynamic partition from storage again,
    and rebuilds its immutable accumulator (copying every earlier key) on each call: for a run
    over 3,000 folders that was 9 million rows read and 27 of the summary step's 28 seconds.
    These keys are the run's own ``context.partition_keys``, so they are targeted by
    construction; they go into the same accumulator, built once (Dagster is pinned, and the
    tests read every partition's metadata back).
    """
    from dagster._core.execution.context.metadata_logging import (
        AssetMetadataHandle,
        OutputMetadataAccumulator,
    )

    step = context.op_execution_context._step_execution_context
    targeted = set(context.partition_keys)
    asset_key = context.assets_def.key
    merged = dict(step._metadata_accumulator.per_output_metadata)
    for key, metadata in metadata_by_key.items():
        assert key in targeted, key
        handle = AssetMetadataHandle(asset_key=asset_key, partition_key=key)
        merged[handle] = {**merged.get(handle, {}), **metadata}
    step._metadata_accumulator = OutputMetadataAccumulator(per_output_metadata=merged)


@dg.op(required_resource_keys={"postgres"}, tags={"kind": "nas"})
def summarize_nas_import(context: dg.AssetExecutionContext, scan: RunPlan, batches: list[BatchCounts]) -> None:
    """One materialization per partition, each with its own counts and listing fingerprint.

    Returns nothing: the asset is the table, and an IO manager could not store one value
    for a range of partitions anyway.
    """
    postgres: PostgresResource = context.resources.postgres
    results = [b.partitions for b in batches]
    seconds = max(time.time() - scan.started, 1e-6)
    run_mb = sum(c.bytes_read for r in results for c in r.values()) / MB
    parts = {key: (p.shop, p.template) for key, p in scan.partitions.items()}
    changed = {parts[key][0] for key, plan in scan.partitions.items()
               if plan.removed or plan.skipped or any(key in r and (r[key].imported or r[key].failed) for r in results)}
    with postgres.engine.begin() as conn:
        changed |= store.link_shops(conn, (shop for shop, _ in parts.values()))
        store.mark_shops_changed(conn, changed)
        duplicates = store.exact_duplicate_counts(conn, parts.values())
        # Every batch step succeeded (this step runs only then): these folders are imported.
        store.save_fingerprints(conn, {key: plan.fingerprint for key, plan in scan.partitions.items()})
    totals = Counts()
    metadata_by_key: dict[str, dict] = {}
    for key, plan in scan.partitions.items():
        total = sum_counts(r[key] for r in results if key in r)
        totals = sum_counts([totals, total])
        metadata = {
            "files_seen": plan.seen,
            "files_imported": total.imported,
            "files_unchanged": plan.unchanged + total.skipped,
            "files_failed": total.failed,
            "files_removed": plan.removed,
            "files_over_size_cap": plan.skipped,
            "listing_problems": len(plan.problems),
            "mb_read": round(total.bytes_read / MB, 2),
            "exact_duplicates": duplicates[parts[key]],
            "listing_fingerprint": plan.fingerprint,
            # The run's figures: batches and time are shared by every partition of the run.
            "run_partitions": len(scan.partitions),
            "batches": scan.batches,
            "mb_per_s": round(run_mb / seconds, 2),
            "seconds": round(seconds, 2),
        }
        if plan.problems:
            metadata["listing_problem_examples"] = dg.MetadataValue.text("\n".join(plan.problems[:50]))
        metadata_by_key[key] = metadata
    add_partition_metadata(context, metadata_by_key)
    # One line for the run; each partition's figures are in its materialization.
    context.log.info(
        f"{len(scan.partitions)} partition(s): {totals.imported} imported, {totals.failed} failed, "
        f"{sum(p.unchanged for p in scan.partitions.values()) + totals.skipped} unchanged, "
        f"{sum(p.removed for p in scan.partitions.values())} removed, {run_mb:,.1f} MB in {seconds:.1f}s "
        f"({run_mb / seconds:,.1f} MB/s)"
    )


@dg.graph_asset(
    partitions_def=nas_partitions,
    # A backfill of many folders is one run: one listing connection, and batches balanced
    # across every folder instead of a run (and its start-up cost) per folder.
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="nas",
    description="Every image under <NAS_BASE_PATH>/<shop>/<template>/ with sha256 and 256-bit pHash.",
    metadata={"table": "design_images"},
)
def design_images():
    batches, scan = plan_nas_batches()
    results = batches.map(import_nas_batch)
    return summarize_nas_import(scan, results.collect())
