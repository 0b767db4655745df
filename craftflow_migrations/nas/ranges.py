"""Partitions imported together: a run has a fixed cost, so neighbouring partitions share one.

A Dagster run can cover a range of partitions (the tags a single-run backfill uses); a
range must be contiguous in the partitions' order, so a set of keys becomes one run per
run of neighbours: usually one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dagster as dg

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def contiguous_ranges(keys: Sequence[str], order: Sequence[str]) -> list[list[str]]:
    """``keys`` cut into runs of neighbours in ``order``."""
    position = {k: i for i, k in enumerate(order)}
    ranges: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        if ranges and position[ranges[-1][-1]] == position[key] - 1:
            ranges[-1].append(key)
        else:
            ranges.append([key])
    return ranges


def partition_tags(keys: Sequence[str]) -> dict[str, str]:
    """Run tags for one partition, or for a range of them."""
    if len(keys) == 1:
        return {"dagster/partition": keys[0]}
    return {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}


def range_run_requests(keys: Sequence[str], order: Sequence[str],
                       run_key: Callable[[list[str]], str]) -> list[dg.RunRequest]:
    requests = []
    for group in contiguous_ranges(keys, order):
        if len(group) == 1:
            requests.append(dg.RunRequest(partition_key=group[0], run_key=run_key(group)))
        else:
            requests.append(dg.RunRequest(run_key=run_key(group), tags=partition_tags(group)))
    return requests
