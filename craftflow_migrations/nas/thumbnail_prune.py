"""Give back the room of thumbnails that no image shows any more: their rows, then their packs.

Thumbnails are content-addressed and shared, so one stays while any imported image (a
``design_images`` row with status ``ok``) has its sha256. The rest (files deleted or replaced
on the NAS, a shop's rows deleted) go in two steps:

1. Their ``design_thumbnails`` rows: found without a lock, then deleted a chunk at a time
   under an exclusive transaction lock that every import's flush takes shared
   (:data:`store.THUMBNAILS_LOCK_KEY`), each row checked again under it. A flush that found a
   sha256 already stored holds its share until its image rows commit, so the prune waits for
   it and then sees the image; a flush after the prune finds the sha256 gone and stores the
   picture again. No image is ever left pointing at a pruned picture.
2. Packs: one that no row points at is deleted; one with less than half of its bytes still
   pointed at is rewritten (its live records appended to a new pack, made durable, their
   rows moved in one transaction under the same lock, then the old file deleted). Only packs
   untouched for ``grace`` are looked at: a running batch step appends to its own pack every
   few seconds, and rows point into it only after its flush commits. A pack with a record that
   does not read back as indexed is left as it is, and said.

Only packs this database registered (``thumbnail_packs``, written before a pack's first byte)
are ever deleted or rewritten: in a folder another database shares, its packs are ones no row
here points at. They are counted and left alone, as are packs from before registration that
no row pointed at when it began.

A report reading a moved thumbnail's old place in the moment between the move's commit and the
old file's deletion shows that one picture as missing (one warning line), never a wrong one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from . import store
from .thumbnail_packs import HEADER, PACK_NAME, PackedThumbnail, PackWriter, read_packed

# A pack less full than this is rewritten: copying its live half costs less than the room it gives back.
REWRITE_BELOW_LIVE_SHARE = 0.5
DEFAULT_GRACE_S = 24 * 3600
# Records read and appended at a time while rewriting: a pack of 100,000 small files' thumbnails
# is about 450 MB, and its live half is never held at once.
REWRITE_CHUNK = 5_000
PRUNE_LOCK_KEY = 0x43465450_52554E45  # one prune at a time ("CFTPRUNE")
# Thumbnail rows deleted under one hold of the lock import flushes wait on.
DELETE_CHUNK = 10_000


@dataclass
class PruneReport:
    dry_run: bool = False
    grace_s: float = DEFAULT_GRACE_S
    rows_deleted: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_recent: int = 0  # touched within the grace period: left alone
    packs_not_ours: int = 0  # not registered by this database: left alone
    bytes_not_ours: int = 0
    bytes_before: int = 0  # of the packs deleted or rewritten
    bytes_after: int = 0  # of their rewritten copies
    problems: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def line(self) -> str:
        """What was done, in one line (the command's output, the scheduled run's log)."""
        out = (f"{'Would prune' if self.dry_run else 'Pruned'}: {self.rows_deleted} thumbnail row(s) no image "
               f"shows; {self.packs_deleted} pack(s) deleted, {self.packs_rewritten} rewritten, "
               f"{self.bytes_freed / 2**20:,.1f} MB given back; {self.packs_recent} pack(s) written in the last "
               f"{self.grace_s / 3600:g} h left as they are")
        if self.packs_not_ours:
            out += (f"; {self.packs_not_ours} pack(s) ({self.bytes_not_ours / 2**20:,.1f} MB) not registered by "
                    "this database left alone (another database's sharing the folder, or from before packs were "
                    "registered)")
        return out


class PruneBusy(RuntimeError):
    """Another prune holds the lock."""


def prune_thumbnails(engine: Engine, folder: Path, grace_s: float = DEFAULT_GRACE_S,
                     dry_run: bool = False) -> PruneReport:
    """Delete the rows of thumbnails no image shows, then delete or rewrite the packs under
    ``folder`` that are mostly or wholly unindexed. ``dry_run`` counts without changing anything."""
    report = PruneReport(dry_run, grace_s)
    with engine.connect() as session:
        if not session.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK_KEY}).scalar():
            raise PruneBusy("another `craftflow-migrate thumbnails --prune` is running; let it finish")
        session.commit()
        try:
            report.rows_deleted = _delete_unshown_rows(engine, dry_run)
            _prune_packs(engine, folder, grace_s, dry_run, report)
        finally:
            try:
                session.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK_KEY})
                session.commit()
            except DBAPIError:
                pass  # the session is gone, and the server released the lock with it (as ledger.runner_session)
    return report


_SHOWN = "EXISTS (SELECT 1 FROM design_images d WHERE d.sha256 = t.sha256 AND d.status = 'ok')"
_UNSHOWN = f"FROM design_thumbnails t WHERE NOT {_SHOWN}"


def _delete_unshown_rows(engine: Engine, dry_run: bool) -> int:
    """Found without the lock, then deleted :data:`DELETE_CHUNK` at a time under it, each one
    checked again: a flush waits for one chunk (tens of ms), not for a scan of the whole table
    (0.7 s at a million thumbnails even with nothing to delete, 2.3 s deleting half of them)."""
    if dry_run:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) " + _UNSHOWN)).scalar_one()
    deleted = 0
    with engine.connect() as scan:
        found = scan.execution_options(stream_results=True).execute(text("SELECT t.sha256 " + _UNSHOWN))
        for chunk in found.scalars().partitions(DELETE_CHUNK):
            with engine.begin() as conn:
                store.lock_thumbnails(conn, exclusive=True)
                # Joined to the chunk as a set (estimated small): looked up by index, where
                # `= ANY(10,000 keys)` had the planner scan both tables, 0.3 s a chunk at a million.
                deleted += conn.execute(text(
                    "DELETE FROM design_thumbnails t USING unnest(CAST(:s AS char(64)[])) AS c(sha256) "
                    "WHERE t.sha256 = c.sha256 AND NOT " + _SHOWN), {"s": store.sha256_array(chunk)}).rowcount
    return deleted


def _packs_on_disk(folder: Path) -> list[tuple[str, os.stat_result]]:
    found = []
    for path in sorted(folder.glob("*/*.pack")):
        name = path.relative_to(folder).as_posix()
        if PACK_NAME.fullmatch(name):
            try:
                found.append((name, path.stat()))
            except FileNotFoundError:  # deleted meanwhile
                continue
    return found


def _prune_packs(engine: Engine, folder: Path, grace_s: float, dry_run: bool, report: PruneReport) -> None:
    # Every row that points into a pack keeps its record; a dry run counts as if the rows of
    # step 1 were gone already.
    with engine.connect() as conn:
        live = {r.pack: r.bytes for r in conn.execute(text(
            f"SELECT pack, sum(pack_length + {HEADER.size}) AS bytes FROM design_thumbnails t "
            f"WHERE pack IS NOT NULL{' AND ' + _SHOWN if dry_run else ''} GROUP BY pack"))}
        ours = store.packs_written_here(conn)
    now = time.time()
    for name, st in _packs_on_disk(folder):
        if name not in ours:
            report.packs_not_ours += 1
            report.bytes_not_ours += st.st_size
            continue
        if now - st.st_mtime < grace_s:
            report.packs_recent += 1
            continue
        live_bytes = live.get(name, 0)
        if live_bytes >= REWRITE_BELOW_LIVE_SHARE * st.st_size:
            continue
        if live_bytes == 0:
            if not dry_run:
                _delete_pack(engine, folder, name, report)
            report.packs_deleted += 1
            report.bytes_before += st.st_size
            continue
        if dry_run:
            report.packs_rewritten += 1
            report.bytes_before += st.st_size
            report.bytes_after += live_bytes
            continue
        written = _rewrite(engine, folder, name, report)
        if written is not None:
            report.packs_rewritten += 1
            report.bytes_before += st.st_size
            report.bytes_after += written


def _rewrite(engine: Engine, folder: Path, name: str, report: PruneReport) -> int | None:
    """Copy ``name``'s live records into a new pack, :data:`REWRITE_CHUNK` at a time, and point
    their rows at it; the new pack's size, or None when the pack was left as it is."""
    with engine.connect() as conn:
        rows = [PackedThumbnail(*r) for r in conn.execute(text(
            f"SELECT {store.PACKED_COLUMNS} FROM design_thumbnails WHERE pack = :p "
            "ORDER BY pack_offset"), {"p": name})]
    writer = PackWriter(folder, register=partial(store.register_pack, engine))
    placed: list[PackedThumbnail] = []
    try:
        for start in range(0, len(rows), REWRITE_CHUNK):
            chunk = rows[start:start + REWRITE_CHUNK]
            found, problems = read_packed(folder, chunk)
            if problems or len(found) != len(chunk):
                report.problems.extend(problems)
                report.problems.append(f"thumbnail pack {folder / name} left as it is: not every record it "
                                       "indexes reads back")
                if writer.name is not None:
                    _delete_pack(engine, folder, writer.name, report)
                return None
            placed += writer.append_all((p.sha256, found[p.sha256]) for p in chunk)
    finally:
        writer.close()
    with engine.begin() as conn:
        store.lock_thumbnails(conn, exclusive=True)
        conn.execute(text("""
            UPDATE design_thumbnails t SET pack = m.pack, pack_offset = m.pack_offset, pack_length = m.pack_length
            FROM unnest(CAST(:shas AS char(64)[]), CAST(:packs AS text[]), CAST(:offsets AS bigint[]),
                        CAST(:lengths AS int[])) AS m(sha256, pack, pack_offset, pack_length)
            WHERE t.sha256 = m.sha256 AND t.pack = :old
        """), {"shas": [p.sha256 for p in placed], "packs": [p.pack for p in placed],
               "offsets": [p.offset for p in placed], "lengths": [p.length for p in placed], "old": name})
    _delete_pack(engine, folder, name, report)
    return (folder / writer.name).stat().st_size


def _delete_pack(engine: Engine, folder: Path, name: str, report: PruneReport) -> None:
    """The file, then its registration (a pack whose file could not be deleted stays registered,
    to be tried again)."""
    path = folder / name
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        report.problems.append(f"thumbnail pack {path} could not be deleted ({exc.strerror or exc})")
        return
    with engine.begin() as conn:
        store.forget_pack(conn, name)
