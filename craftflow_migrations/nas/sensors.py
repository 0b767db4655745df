"""Automation for the NAS import: a scan sensor and the chain from the startup job.

The scan sensor lists the NAS and requests runs for partitions whose listing differs from
their latest materialization and that no queued or running import covers (see
``partitions.py``): a run that failed is requested again on the next tick. Both sensors
request one run per contiguous range of such partitions (a single run when they are
neighbours), as the worker does.
"""

import hashlib

import dagster as dg

from ..resources import PostgresResource
from .assets import pending_startup_migrations
from .clients import NasError
from .listing import list_nas
from .partitions import DESIGN_IMAGES, partitions_to_import
from .ranges import range_run_requests
from .resource import NasResource


def build_nas_scan_sensor(job, partitions: dg.DynamicPartitionsDefinition,
                          interval_s: int = 300) -> dg.SensorDefinition:
    @dg.sensor(
        name="nas_scan_sensor",
        job=job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Scan the NAS; add new <shop>/<template> partitions and import new, changed or failed ones.",
    )
    def nas_scan_sensor(context: dg.SensorEvaluationContext, nas: NasResource, postgres: PostgresResource):
        if nas.missing():
            return dg.SkipReason(f"NAS credentials not configured: set {', '.join(nas.missing())}")
        pending = pending_startup_migrations(postgres.engine)
        if pending:
            return dg.SkipReason(f"Schema is not at head (pending: {', '.join(pending)}); waiting for the startup job")
        try:
            with nas.open() as client:
                listings, _ = list_nas(client, logger=context.log)
        except NasError as exc:
            return dg.SkipReason(f"NAS not reachable: {exc}")
        current = {key: listing.fingerprint for key, listing in listings.items()}
        order = list(context.instance.get_dynamic_partitions(partitions.name))
        known = set(order)
        new_keys = sorted(k for k in current if k not in known)
        order += new_keys  # new keys are added in this order before the runs start, so ranges can span them
        todo = partitions_to_import(context.instance, current, order)
        context.log.info(f"{len(current)} partitions on the NAS, {len(new_keys)} new, {len(todo)} to import")

        def run_key(group: list[str]) -> str:
            # Unique per request: a folder whose run failed must be requested again, and
            # partitions already in flight were left out above.
            digest = hashlib.sha256("".join(f"{k}@{current[k]}\n" for k in group).encode()).hexdigest()[:16]
            return f"{group[0]} .. {group[-1]}@{digest}@{context.cursor or 0}"

        tick = str(int(context.cursor or 0) + 1)
        context.update_cursor(tick)
        return dg.SensorResult(
            run_requests=range_run_requests(todo, order, run_key),
            dynamic_partitions_requests=[partitions.build_add_request(new_keys)] if new_keys else [],
        )

    return nas_scan_sensor


def build_import_after_startup_sensor(startup_job: dg.JobDefinition, job,
                                      partitions: dg.DynamicPartitionsDefinition) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        name="import_after_startup",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[startup_job],
        request_job=job,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="When the startup job succeeds, import every partition not yet materialized.",
    )
    def import_after_startup(context: dg.RunStatusSensorContext):
        done = context.instance.get_materialized_partitions(DESIGN_IMAGES)
        order = list(context.instance.get_dynamic_partitions(partitions.name))
        keys = [k for k in order if k not in done]
        if not keys:
            return dg.SkipReason("Every known partition is already imported")
        return range_run_requests(keys, order, lambda group: f"{context.dagster_run.run_id}:{group[0]}")

    return import_after_startup
