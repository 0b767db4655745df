"""Compare a partition's listing with design_images: what to import, what is unchanged, what left."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from .client import NasFile
from .store import KnownRow


@dataclass
class PartitionDiff:
    to_import: list[NasFile] = field(default_factory=list)
    unchanged: list[NasFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def bytes_to_import(self) -> int:
        return sum(f.size for f in self.to_import)


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
