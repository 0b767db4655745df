"""The one ``Definitions`` of the code location: jobs, assets, sensors, schedules, resources."""

import dagster as dg

from .duplicates.assets import design_duplicates, failed_share_under_limit, hashes_use_current_algorithm
from .executors import build_executor, executor_run_config
from .nas.assets import BATCH_STEP_TAG, design_images, nas_partitions
from .nas.partitions import NAS_IMPORT_JOB
from .nas.sensors import build_import_after_startup_sensor, build_nas_scan_sensor
from .nas.thumbnail_jobs import thumbnail_prune_job, thumbnail_prune_schedule
from .resources import build_resources
from .schema.discovery import discover
from .schema.jobs import COMPLEX_JOB, STARTUP_JOB, build_migration_job
from .settings import get_settings, migrations_dir

DUPLICATES_JOB = "duplicates"

migration_plan = discover(migrations_dir())
startup_job = build_migration_job("startup", migration_plan, STARTUP_JOB)
complex_migrations_job = build_migration_job("complex", migration_plan, COMPLEX_JOB)


def nas_import_run_config(max_concurrent: int | None = None) -> dict:
    """Default run config of the import; every value can be changed in the launchpad."""
    workers = max_concurrent or get_settings().nas.max_concurrent
    # Batch steps are capped by their tag; max_concurrent has one slot more because the plan
    # step's process holds its slot for about 0.1 s after the step succeeds, which held the
    # second batch step back by as long.
    key, value = BATCH_STEP_TAG
    return {
        **executor_run_config(workers + 1, [{"key": key, "value": value, "limit": workers}]),
        "ops": {"design_images": {"ops": {"plan_nas_batches": {"config": {"parallel_batches": workers}}}}},
    }


nas_import_job = dg.define_asset_job(
    NAS_IMPORT_JOB,
    selection=dg.AssetSelection.assets(design_images).without_checks(),
    config=nas_import_run_config(),
    executor_def=build_executor(),
    description="Import one <shop>/<template> folder of the NAS into design_images.",
)

duplicates_job = dg.define_asset_job(
    DUPLICATES_JOB,
    selection=dg.AssetSelection.assets(design_duplicates) | dg.AssetSelection.checks_for_assets(design_images),
    executor_def=dg.in_process_executor,
    description="Group duplicate designs, write the report, and check design_images.",
)

complex_migrations_schedule = dg.ScheduleDefinition(
    name="complex_migrations_weekly",
    job=complex_migrations_job,
    cron_schedule="0 3 * * 0",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Apply pending complex migrations on Sunday night (off until turned on).",
)

defs = dg.Definitions(
    assets=[design_images, design_duplicates],
    asset_checks=[hashes_use_current_algorithm, failed_share_under_limit],
    jobs=[startup_job, complex_migrations_job, nas_import_job, duplicates_job, thumbnail_prune_job],
    sensors=[
        build_nas_scan_sensor(nas_import_job, nas_partitions),
        build_import_after_startup_sensor(startup_job, nas_import_job, nas_partitions),
    ],
    schedules=[complex_migrations_schedule, thumbnail_prune_schedule],
    resources=build_resources(),
)


# Module-level factories so `reconstructable` can rebuild each job in another process.
def startup_job_factory() -> dg.JobDefinition:
    return defs.resolve_job_def(STARTUP_JOB)


def complex_migrations_job_factory() -> dg.JobDefinition:
    return defs.resolve_job_def(COMPLEX_JOB)


def nas_import_job_factory() -> dg.JobDefinition:
    return defs.resolve_job_def(NAS_IMPORT_JOB)


def duplicates_job_factory() -> dg.JobDefinition:
    return defs.resolve_job_def(DUPLICATES_JOB)
