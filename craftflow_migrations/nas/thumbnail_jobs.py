"""The thumbnail prune as a Dagster job, and the weekly schedule that runs it (thin over
:mod:`.thumbnail_prune`, which ``craftflow-migrate thumbnails --prune`` runs as well)."""

import dagster as dg

from ..resources import PostgresResource
from .resource import NasResource
from .thumbnail_prune import DEFAULT_GRACE_S, PruneBusy, prune_thumbnails

THUMBNAIL_PRUNE_JOB = "thumbnail_prune"


class PruneConfig(dg.Config):
    grace_hours: float = DEFAULT_GRACE_S / 3600
    dry_run: bool = False


@dg.op(required_resource_keys={"postgres", "nas"}, tags={"kind": "thumbnails"})
def prune_unshown_thumbnails(context: dg.OpExecutionContext, config: PruneConfig) -> dg.Output[None]:
    """Delete the thumbnail rows no imported image shows, then this database's packs that are
    empty or less than half live (rewritten), leaving packs younger than ``grace_hours``."""
    postgres: PostgresResource = context.resources.postgres
    nas: NasResource = context.resources.nas
    folder = nas.settings.thumbnail_folder
    try:
        report = prune_thumbnails(postgres.engine, folder, grace_s=config.grace_hours * 3600,
                                  dry_run=config.dry_run)
    except PruneBusy as exc:
        # A prune started by hand holds the lock: this week's is then already being done.
        context.log.warning(f"Thumbnail prune skipped: {exc}")
        return dg.Output(None, metadata={"skipped": str(exc)})
    context.log.info(f"{report.line()} (folder {folder})")
    for line in report.problems[:20]:
        context.log.warning(line)
    return dg.Output(None, metadata={
        "dry_run": report.dry_run,
        "rows_deleted": report.rows_deleted,
        "packs_deleted": report.packs_deleted,
        "packs_rewritten": report.packs_rewritten,
        "mb_freed": round(report.bytes_freed / 2**20, 1),
        "packs_recent": report.packs_recent,
        "packs_not_ours": report.packs_not_ours,
        "problems": len(report.problems),
        "folder": str(folder),
    })


@dg.job(name=THUMBNAIL_PRUNE_JOB, executor_def=dg.in_process_executor,
        description="Give back the room of thumbnails no image shows (craftflow-migrate thumbnails --prune).")
def thumbnail_prune_job() -> None:
    prune_unshown_thumbnails()


thumbnail_prune_schedule = dg.ScheduleDefinition(
    name="thumbnail_prune_weekly",
    job=thumbnail_prune_job,
    cron_schedule="0 4 * * 0",
    # On by default: it only ever deletes what no image of this database shows, from packs this
    # database wrote and nobody appended to for a day, and it waits for imports' flushes.
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Prune thumbnails no image shows, Sunday 04:00 (after complex_migrations_weekly).",
)
