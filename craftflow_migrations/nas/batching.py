"""Cut a partition's file list into batches of about ``target_bytes``.

Batches are balanced rather than filled one after the other: 600 MB becomes two 300 MB
batches, not 500 + 100, so parallel steps finish together. A partition is also split
across ``workers`` (down to ``min_batch_bytes`` per batch) so a small partition still
keeps every core busy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .client import NasFile

MB = 1024 * 1024


def plan_batches(files: Sequence[NasFile], target_bytes: int = 500 * MB, workers: int = 1,
                 min_batch_bytes: int = 32 * MB) -> list[list[NasFile]]:
    if not files:
        return []
    total = sum(f.size for f in files)
    count = max(
        math.ceil(total / max(target_bytes, 1)),
        min(workers, max(1, total // max(min_batch_bytes, 1)), len(files)),
        1,
    )
    per_batch = total / count
    batches: list[list[NasFile]] = [[]]
    filled = 0
    for f in files:
        # Close the batch when this file would take it further past the share than leaving it out.
        if batches[-1] and len(batches) < count and filled + f.size / 2 > per_batch:
            batches.append([])
            filled = 0
        batches[-1].append(f)
        filled += f.size
    return batches
