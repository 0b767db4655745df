"""The ``design_images`` asset: one partition per <shop>/<template> folder on the NAS.

Graph-backed: ``plan_nas_batches`` lists the folder, diffs it against the table and
yields one dynamic output per ~500 MB batch; ``import_nas_batch`` steps are mapped over
them (in parallel under the multiprocess executor) and ``summarize_nas_import``
collects the results into the materialization's metadata.
"""

import time
from dataclasses import asdict

import dagster as dg

from ..db import PostgresResource
from ..schema import runner
from ..schema.discovery import discover
from ..settings import migrations_dir
from . import store
from .batching import MB, plan_batches
from .client import NasError, NasFile, split_partition_key
from .importer import import_batch
from .resource import NasResource
from .scan import diff_partition, listing_fingerprint

nas_partitions = dg.DynamicPartitionsDefinition(name="nas_shop_templates")
SFTP_POOL = "nas_sftp"


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
    out={"batches": dg.DynamicOut(dict), "scan": dg.Out(dict)},
    required_resource_keys={"postgres", "nas"},
    tags={"kind": "nas"},
)
def plan_nas_batches(context: dg.OpExecutionContext, config: NasImportConfig):
    postgres: PostgresResource = context.resources.postgres
    nas: NasResource = context.resources.nas
    shop, template = split_partition_key(context.partition_key)
    schema_gate(postgres.engine)
    if nas.missing():
        raise dg.Failure(description=f"NAS credentials not configured: set {', '.join(nas.missing())}")
    started = time.monotonic()
    try:
        client = nas.open()
        try:
            files = client.list_files(shop, template)
        finally:
            client.close()
    except NasError as exc:
        raise dg.Failure(description=str(exc)) from None
    with postgres.engine.begin() as conn:
        diff = diff_partition(files, store.known_rows(conn, shop, template))
        removed = store.mark_removed(conn, shop, template, diff.removed)
    if nas.batched:
        batches = plan_batches(diff.to_import, config.batch_size_mb * MB, config.parallel_batches,
                               config.min_batch_mb * MB)
    else:
        batches = [diff.to_import] if diff.to_import else []
    context.log.info(
        f"{shop}/{template}: {len(files)} files on {nas.description}, {len(diff.unchanged)} unchanged, "
        f"{len(diff.to_import)} to import ({diff.bytes_to_import / MB:,.1f} MB in {len(batches)} batches), "
        f"{removed} removed; listed in {time.monotonic() - started:.2f}s"
    )
    yield dg.Output(
        {"seen": len(files), "unchanged": len(diff.unchanged), "removed": removed,
         "to_import": len(diff.to_import), "batches": len(batches), "started": time.time(),
         "fingerprint": listing_fingerprint(files)},
        output_name="scan",
    )
    for i, batch in enumerate(batches):
        yield dg.DynamicOutput(
            {"index": i + 1, "count": len(batches), "sequential": not nas.batched,
             "files": [asdict(f) for f in batch]},
            mapping_key=f"batch_{i + 1:04d}",
            output_name="batches",
        )


@dg.op(
    required_resource_keys={"postgres", "nas"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS),
    pool=SFTP_POOL,
    tags={"kind": "nas"},
)
def import_nas_batch(context: dg.OpExecutionContext, batch: dict) -> dict:
    """Fetch and hash one batch; bad files are recorded, a lost connection retries the batch."""
    postgres: PostgresResource = context.resources.postgres
    nas: NasResource = context.resources.nas
    files = [NasFile(**f) for f in batch["files"]]
    label = f"{context.partition_key} batch {batch['index']}/{batch['count']}"
    if context.retry_number:
        context.log.warning(f"{label}: attempt {context.retry_number + 1} of 3")
    client = nas.open()
    try:
        result = import_batch(client, postgres.engine, files, label, context.log,
                              pipelined=not batch["sequential"])
    finally:
        client.close()
    context.log.info(
        f"{label} done: {result.imported} imported, {result.failed} failed, {result.skipped} already done, "
        f"{result.bytes_read / MB:,.1f} MB at {result.mb_per_s:,.1f} MB/s"
    )
    return asdict(result) | {"mb_per_s": result.mb_per_s}


@dg.op(required_resource_keys={"postgres"}, tags={"kind": "nas"})
def summarize_nas_import(context: dg.OpExecutionContext, scan: dict, results: list[dict]) -> dict:
    postgres: PostgresResource = context.resources.postgres
    shop, template = split_partition_key(context.partition_key)
    with postgres.engine.begin() as conn:
        store.link_shop(conn, shop)
        duplicates = store.exact_duplicate_count(conn, shop, template)
    seconds = max(time.time() - scan["started"], 1e-6)
    mb_read = sum(r["bytes_read"] for r in results) / MB
    summary = {
        "files_seen": scan["seen"],
        "files_imported": sum(r["imported"] for r in results),
        "files_unchanged": scan["unchanged"] + sum(r["skipped"] for r in results),
        "files_failed": sum(r["failed"] for r in results),
        "files_removed": scan["removed"],
        "batches": len(results),
        "mb_read": round(mb_read, 2),
        "mb_per_s": round(mb_read / seconds, 2),
        "seconds": round(seconds, 2),
        "exact_duplicates": duplicates,
        "listing_fingerprint": scan["fingerprint"],
    }
    context.log.info(f"{shop}/{template}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k.startswith(("files", "mb", "sec", "exact"))))
    context.add_output_metadata(summary)
    return summary


@dg.graph_asset(
    partitions_def=nas_partitions,
    group_name="nas",
    description="Every image under <NAS_BASE_PATH>/<shop>/<template>/ with sha256 and 256-bit pHash.",
    metadata={"table": "design_images"},
)
def design_images():
    batches, scan = plan_nas_batches()
    results = batches.map(import_nas_batch)
    return summarize_nas_import(scan, results.collect())
