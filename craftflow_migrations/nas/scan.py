"""Compare a partition's listing with design_images: what to import, what is unchanged, what left."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from . import store
from .client import NasClient, NasFile, partition_key, split_partition_key, unusable_name
from .store import KnownRow


@dataclass
class PartitionDiff:
    to_import: list[NasFile] = field(default_factory=list)
    unchanged: list[NasFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def diff_partition(files: Sequence[NasFile], known: dict[str, KnownRow]) -> PartitionDiff:
    diff = PartitionDiff()
    for f in files:
        row = known.get(f.path)
        (diff.unchanged if row is not None and row.is_current(f) else diff.to_import).append(f)
    listed = {f.path for f in files}
    diff.removed = sorted(p for p, row in known.items() if p not in listed and row.status != "removed")
    return diff


def listing_fingerprint(files: Sequence[NasFile]) -> str:
    """A digest of every file's path, size and mtime: equal listings, equal fingerprints."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{f.mtime:.6f}\n".encode())
    return digest.hexdigest()[:32]


def fingerprint_partitions(client: NasClient, logger: logging.Logger,
                           keys: Sequence[str] | None = None) -> dict[str, str]:
    """Listing fingerprint of every usable <shop>/<template> folder (or of ``keys``)."""
    if keys is None:
        pairs = []
        for shop, template in client.list_partitions():
            problem = unusable_name(shop) or unusable_name(template)
            if problem:
                logger.warning(f"Skipping {shop}/{template}: {problem}")
            else:
                pairs.append((shop, template))
    else:
        pairs = [split_partition_key(k) for k in keys]
    return {partition_key(s, t): listing_fingerprint(client.list_files(s, t)) for s, t in pairs}


@dataclass
class PartitionScan:
    """One partition's listing compared with its rows; removed files are already marked."""

    key: str
    seen: int
    unchanged: int
    removed: int
    to_import: list[NasFile]
    fingerprint: str

    @property
    def bytes_to_import(self) -> int:
        return sum(f.size for f in self.to_import)


def scan_for_import(client: NasClient, engine: Engine, keys: Sequence[str]) -> list[PartitionScan]:
    """List each partition, diff it against design_images and mark what left the NAS."""
    scans = []
    for key in keys:
        shop, template = split_partition_key(key)
        files = client.list_files(shop, template)
        with engine.begin() as conn:
            diff = diff_partition(files, store.known_rows(conn, shop, template))
            removed = store.mark_removed(conn, shop, template, diff.removed)
        scans.append(PartitionScan(key, len(files), len(diff.unchanged), removed, diff.to_import,
                                   listing_fingerprint(files)))
    return scans
