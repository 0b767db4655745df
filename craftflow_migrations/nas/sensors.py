"""Automation for the NAS import: a scan sensor and the chain from the startup job.

The scan sensor keeps one fingerprint per partition in its cursor (a digest of every
file's path, size and mtime), so a tick only requests runs for folders that are new or
changed, never a full re-import. Both sensors request one run per contiguous range of
such partitions (a single run when they are neighbours), as the worker does.
"""

import hashlib
import json

import dagster as dg

from ..db import PostgresResource
from .assets import pending_startup_migrations
from .client import NasError
from .ranges import range_run_requests
from .resource import NasResource
from .scan import fingerprint_partitions

DESIGN_IMAGES = dg.AssetKey("design_images")


def build_nas_scan_sensor(job, partitions: dg.DynamicPartitionsDefinition,
                          interval_s: int = 300) -> dg.SensorDefinition:
    @dg.sensor(
        name="nas_scan_sensor",
        job=job,
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Scan the NAS; add new <shop>/<template> partitions and import new or changed ones.",
    )
    def nas_scan_sensor(context: dg.SensorEvaluationContext, nas: NasResource, postgres: PostgresResource):
        if nas.missing():
            return dg.SkipReason(f"NAS credentials not configured: set {', '.join(nas.missing())}")
        pending = pending_startup_migrations(postgres.engine)
        if pending:
            return dg.SkipReason(f"Schema is not at head (pending: {', '.join(pending)}); waiting for the startup job")
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        try:
            client = nas.open()
            try:
                current = fingerprint_partitions(client, context.log)
            finally:
                client.close()
        except NasError as exc:
            return dg.SkipReason(f"NAS not reachable: {exc}")
        order = list(context.instance.get_dynamic_partitions(partitions.name))
        known = set(order)
        new_keys = sorted(k for k in current if k not in known)
        changed = sorted(k for k, fp in current.items() if seen.get(k) != fp)
        context.log.info(f"{len(current)} partitions on the NAS, {len(new_keys)} new, {len(changed)} new or changed")

        def run_key(group: list[str]) -> str:
            # The same folders with the same contents: the same key, so a re-tick is not re-run.
            if len(group) == 1:
                return f"{group[0]}@{current[group[0]]}"
            digest = hashlib.sha256("".join(f"{k}@{current[k]}\n" for k in group).encode()).hexdigest()[:16]
            return f"{group[0]} .. {group[-1]}@{digest}"

        return dg.SensorResult(
            # New keys are added in this order before the runs start, so ranges can span them.
            run_requests=range_run_requests(changed, order + new_keys, run_key),
            dynamic_partitions_requests=[partitions.build_add_request(new_keys)] if new_keys else [],
            cursor=json.dumps(current, sort_keys=True),
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
