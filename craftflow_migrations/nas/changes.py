"""A run's listing against design_images: what to import, what is unchanged, what left.

One place decides, for all of a run's partitions at once (one query, one UPDATE, one
INSERT), so thousands of folders cost a few round trips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Engine

from . import store
from .hashing import ImageFacts
from .listing import NasFile, PartitionListing


@dataclass
class PartitionScan:
    """One partition's listing compared with its rows; removals and skips are already written."""

    key: str
    shop: str
    template: str
    seen: int
    unchanged: int
    removed: int
    skipped: int
    to_import: list[NasFile]
    fingerprint: str
    problems: list[str] = field(default_factory=list)
    had_rows: set[str] = field(default_factory=set)  # paths of to_import that have a row (changed files)

    @property
    def bytes_to_import(self) -> int:
        return sum(f.size for f in self.to_import)


def _under(path: str, folders: list[str]) -> bool:
    return any(path == u or path.startswith(u + "/") for u in folders)


def scan_for_import(listings: Mapping[str, PartitionListing], engine: Engine, listed_at: datetime,
                    max_file_bytes: int) -> list[PartitionScan]:
    """Diff every partition; mark what left the NAS and record files over the size cap."""
    parts = {key: (li.folder.shop, li.folder.template) for key, li in listings.items()}
    scans: list[PartitionScan] = []
    removed_rows: list[tuple[str, str, str]] = []
    too_large: list[dict] = []
    with engine.begin() as conn:
        known = store.known_rows(conn, parts.values())
        for key, listing in listings.items():
            rows = known[parts[key]]
            unchanged, to_import, skipped, had_rows = 0, [], 0, set()
            for f in listing.files:
                row = rows.get(f.path)
                if row is not None and row.is_current(f, max_file_bytes):
                    unchanged += 1
                elif f.size > max_file_bytes:
                    skipped += 1
                    reason = (f"skipped: {f.size / 2**20:,.0f} MB is over NAS_MAX_FILE_MB "
                              f"({max_file_bytes // 2**20:,} MB); not read")
                    too_large.append(store.row_for(f, ImageFacts(None, None, None, None, None, reason),
                                                   listed_at, status="skipped"))
                else:
                    to_import.append(f)
                    if row is not None:
                        had_rows.add(f.path)
            listed = {f.path for f in listing.files}
            gone = [p for p, row in rows.items()
                    if p not in listed and row.status != "removed" and not _under(p, listing.unlisted)]
            removed_rows += [(*parts[key], p) for p in gone]
            scans.append(PartitionScan(key, *parts[key], len(listing.files), unchanged, len(gone), skipped, to_import,
                                       listing.fingerprint, [p.line() for p in listing.problems], had_rows))
        store.mark_removed(conn, removed_rows, listed_at)
        store.upsert(conn, too_large)
    return scans
