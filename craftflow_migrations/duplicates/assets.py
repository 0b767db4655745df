"""The design_duplicates asset and the checks on design_images."""

import time
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field
from sqlalchemy import text

from ..nas.assets import design_images
from ..nas.phash_algorithm import PHASH_ALGORITHM
from ..resources import PostgresResource
from ..settings import get_settings
from . import store
from .grouping import CANDIDATE_BITS, DEFAULT_THRESHOLD, Matching, cluster, make_group, members_of
from .report import write_report
from .similarity import SAME_PICTURE


def default_report_dir() -> Path:
    settings = get_settings()
    if settings.report_dir:
        return Path(settings.report_dir)
    return Path(settings.dagster_home or ".") / "reports" / "duplicates"


class DuplicatesConfig(dg.Config):
    # Validated with the run config, so a bad value is refused at launch with its name.
    threshold: int = Field(DEFAULT_THRESHOLD, ge=0, le=255,
                           description="pHashes this close (bits of 256) are one design without a second look")
    candidate_bits: int = Field(CANDIDATE_BITS, ge=0, le=255,
                                description="up to this far apart, the stored thumbnails decide")
    same_picture: float = Field(SAME_PICTURE, gt=0.0, le=1.0,
                                description="thumbnail score from which two files are the same picture")
    report_dir: str = ""
    # Regroup every scope, not only those whose images changed (after editing shops' tenants).
    full: bool = False


@dg.asset(
    deps=[design_images],
    group_name="nas",
    description="Exact and near-duplicate designs per tenant, the copy to keep, and an HTML report.",
    metadata={"tables": "design_duplicate_groups, design_duplicate_members"},
)
def design_duplicates(context: dg.AssetExecutionContext, config: DuplicatesConfig,
                      postgres: PostgresResource) -> dg.MaterializeResult:
    """Regroup only the scopes (tenants) whose images changed since the last run."""
    matching = Matching(sure_bits=config.threshold, candidate_bits=max(config.threshold, config.candidate_bits),
                        same_picture=config.same_picture)
    started = time.monotonic()
    with postgres.engine.begin() as conn:
        store.lock_groups(conn)
        scopes = None if config.full else store.take_changed_scopes(conn)
        table = store.load_hashes(conn, scopes)
        loaded_s = time.monotonic() - started
        result = cluster(table.words, table.scopes, table.shas, matching, store.thumbnail_source(conn))
        parts = members_of(result.labels)
        rows = store.load_rows(conn, table.ids[np.concatenate(parts)] if parts else [])
        groups = [make_group([rows[int(table.ids[i])] for i in part]) for part in parts]
        grouped_s = time.monotonic() - started - loaded_s
        store.replace_groups(conn, groups, config.threshold, scopes)
        written_s = time.monotonic() - started - loaded_s - grouped_s
    out_dir = Path(config.report_dir) if config.report_dir else default_report_dir()
    with postgres.engine.connect() as conn:
        every_group = store.stored_groups(conn)
        report = write_report(every_group, out_dir, store.thumbnail_source(conn), store.scope_labels(conn))
    report_s = time.monotonic() - started - loaded_s - grouped_s - written_s
    exact = sum(g.kind == "exact" for g in every_group)
    regrouped = "every scope" if scopes is None else f"{len(scopes)} changed scope(s)"
    context.log.info(
        f"{regrouped}: {len(table)} hashed images loaded in {loaded_s:.2f}s and regrouped in {grouped_s:.2f}s "
        f"({result.checked_pairs} pairs checked on thumbnails, {result.confirmed_pairs} confirmed); {exact} exact "
        f"and {len(every_group) - exact} near-duplicate groups in all; report {report}"
    )
    return dg.MaterializeResult(metadata={
        "images_regrouped": len(table),
        "scopes_regrouped": -1 if scopes is None else len(scopes),
        "exact_groups": exact,
        "near_groups": len(every_group) - exact,
        "images_in_groups": sum(len(g.members) for g in every_group),
        "threshold_bits": config.threshold,
        "candidate_bits": matching.candidate_bits,
        "candidate_pairs": result.candidate_pairs,
        "pairs_checked_on_thumbnails": result.checked_pairs,
        "pairs_confirmed_on_thumbnails": result.confirmed_pairs,
        "pairs_without_thumbnails": result.unchecked_pairs,
        "bytes_freed_by_removing_copies": sum(m.size_bytes for g in every_group for m in g.members
                                              if m.id != g.keep.id),
        "loading_seconds": round(loaded_s, 3),
        "grouping_seconds": round(grouped_s, 3),
        "writing_seconds": round(written_s, 3),
        "report_seconds": round(report_s, 3),
        "report": dg.MetadataValue.url(report.resolve().as_uri()),
        "report_path": dg.MetadataValue.path(str(report.resolve())),
    })


@dg.asset_check(asset=design_images, description="Every imported image is hashed with the current algorithm.")
def hashes_use_current_algorithm(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.engine.connect() as conn:
        stale = conn.execute(text(
            "SELECT count(*) FROM design_images WHERE status = 'ok' "
            "AND (phash IS NULL OR hash_algorithm IS DISTINCT FROM :a)"), {"a": PHASH_ALGORITHM}).scalar()
    return dg.AssetCheckResult(passed=stale == 0, metadata={"stale_rows": stale, "algorithm": PHASH_ALGORITHM})


@dg.asset_check(asset=design_images, description="The share of failed files stays under MAX_FAILED_SHARE (5%).")
def failed_share_under_limit(postgres: PostgresResource) -> dg.AssetCheckResult:
    limit = get_settings().max_failed_share
    with postgres.engine.connect() as conn:
        total, failed = conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE status = 'failed') FROM design_images "
            "WHERE status <> 'removed'")).one()
    share = failed / total if total else 0.0
    return dg.AssetCheckResult(
        passed=share <= limit,
        metadata={"failed": failed, "files": total, "failed_share": round(share, 4), "limit": limit},
    )
