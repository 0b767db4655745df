"""Thumbnails in append-only pack files of a folder, indexed by ``design_thumbnails`` rows.

Each batch step appends the thumbnails it makes to one pack file of its own
(``<folder>/<yyyy-mm>/<uuid>.pack``), and its rows in PostgreSQL say where each one lies
(pack, offset, length). A record is a 40-byte header (``CFT1``, the file's raw sha256, the
length) and the bytes, so a pack describes itself: a reader checks that the header names the
sha256 it asked for, and a pack can be verified or re-indexed without the database.

Durability is ordered: a flush writes its records and ``fsync``s the pack before the
transaction that indexes them commits. A step killed in between leaves bytes no row points
at, never a row pointing at bytes that are not there.

Why a folder: kept in PostgreSQL, a 9 KB thumbnail cost the machine 0.1-0.18 ms (TOAST chunks,
their index, WAL, the COPY stream), as much as hashing the small file it shows; appended to a
pack it is a piece of one ``writev`` a flush (``benchmarks/README.md``, item 43).
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAGIC = b"CFT1"
HEADER = struct.Struct(">4s32sI")  # magic, the file's sha256 (raw), the thumbnail's length
SETTING = "CRAFTFLOW_THUMBNAIL_DIR"
# What PackWriter names its packs; an index row naming anything else is never opened.
PACK_NAME = re.compile(r"\d{4}-\d{2}/[0-9a-f]{32}\.pack")


class ThumbnailStoreError(RuntimeError):
    """The thumbnail folder cannot be written; the message names it, the setting and the fix."""


@dataclass(frozen=True, slots=True)
class PackedThumbnail:
    """Where one thumbnail lies: its pack (relative to the folder), the offset of its bytes, their length."""

    sha256: str
    pack: str
    offset: int
    length: int


def _cannot_write(folder: Path, exc: OSError) -> ThumbnailStoreError:
    return ThumbnailStoreError(
        f"Cannot write thumbnails to {folder} ({exc.strerror or exc}): make it writable and give it room, "
        f"or point {SETTING} at a folder that is (CRAFTFLOW_THUMBNAIL_STORE=postgres keeps them in PostgreSQL)")


class PackWriter:
    """Appends to one new pack file of this writer's own; nothing is durable before :meth:`append_all` returns.

    One writer per batch step attempt: no two processes ever append to the same file, so no
    lock is needed, and a failed attempt's partial tail is in a pack nobody appends to again.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.name: str | None = None
        self.fd: int | None = None
        self.size = 0

    def _open(self) -> None:
        month = datetime.now(timezone.utc).strftime("%Y-%m")
        name = f"{month}/{uuid.uuid4().hex}.pack"
        path = self.folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            # The new name itself must survive a crash, or a committed row would point at nothing.
            _fsync_folder(path.parent)
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.name = name

    def append_all(self, thumbnails: Iterable[tuple[str, bytes]]) -> list[PackedThumbnail]:
        """Append every ``(sha256, bytes)`` in one ``writev`` and make them durable (``fsync``)."""
        thumbnails = list(thumbnails)
        if not thumbnails:
            return []
        if self.fd is None:
            self._open()
        pieces: list[bytes] = []
        placed: list[PackedThumbnail] = []
        offset = self.size
        for sha, data in thumbnails:
            pieces.append(HEADER.pack(MAGIC, bytes.fromhex(sha), len(data)))
            pieces.append(data)
            offset += HEADER.size
            placed.append(PackedThumbnail(sha, self.name, offset, len(data)))
            offset += len(data)
        try:
            _write_all(self.fd, pieces)
            os.fsync(self.fd)
            _drop_cached(self.fd, offset)
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.size = offset
        return placed

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """Every piece, in order, straight from its own buffer (``writev``, IOV_MAX pieces a call).

    Joined first, a flush's 46 MB of small files' thumbnails was one more buffer to fault in
    and copy: 28 us of system time a 9 KB thumbnail, against 18-24 this way.
    """
    iov_max = os.sysconf("SC_IOV_MAX")
    for start in range(0, len(pieces), iov_max):
        group = pieces[start:start + iov_max]
        written = os.writev(fd, group)
        if written < sum(len(p) for p in group):  # short (a signal, a nearly full disk): the rest in turn
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _drop_cached(fd: int, size: int) -> None:
    """Let the kernel drop a pack's pages once they are on disk, all but the last, partial one
    (the next flush appends to it; dropped, it would be read back from disk first).

    Written once and read rarely (the report reads the few it shows), they would grow the
    page cache by a GB per 100,000 small files, pushing out the NAS's files and PostgreSQL's;
    and each new page-cache page cost this VM about 1.7 us a KB: 19-21 us of system time a
    9 KB record kept against 4.8-5.1 dropped, alternated three times.
    """
    whole_pages = size - size % _PAGE
    if whole_pages and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, whole_pages, os.POSIX_FADV_DONTNEED)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_packed(folder: Path, packed: Iterable[PackedThumbnail]) -> tuple[dict[str, bytes], list[str]]:
    """The thumbnails' bytes by sha256, and one line for each pack that could not be read.

    Each pack is opened once and read in offset order. A thumbnail whose pack is missing,
    short or does not hold that sha256 at that place is left out (no picture, never a wrong
    one); the lines say which folder was read and what to set.
    """
    by_pack: dict[str, list[PackedThumbnail]] = defaultdict(list)
    for p in packed:
        by_pack[p.pack].append(p)
    found: dict[str, bytes] = {}
    problems: list[str] = []
    for name, wanted in sorted(by_pack.items()):
        path = folder / name
        if not PACK_NAME.fullmatch(name or ""):
            problems.append(f"thumbnail index names {name!r}, not a pack of {folder}: {len(wanted)} thumbnail(s) "
                            "not shown (the row was not written by an import)")
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            problems.append(f"thumbnail pack {path} could not be opened ({exc.strerror or exc}): "
                            f"{len(wanted)} thumbnail(s) not shown; if the folder moved, set {SETTING} to it")
            continue
        bad = 0
        try:
            for p in sorted(wanted, key=lambda p: p.offset):
                record = os.pread(fd, HEADER.size + p.length, p.offset - HEADER.size)
                if len(record) != HEADER.size + p.length:
                    bad += 1
                    continue
                magic, sha, length = HEADER.unpack_from(record)
                if magic != MAGIC or sha.hex() != p.sha256 or length != p.length:
                    bad += 1
                    continue
                found[p.sha256] = record[HEADER.size:]
        finally:
            os.close(fd)
        if bad:
            problems.append(f"thumbnail pack {path}: {bad} record(s) missing or not the thumbnail indexed "
                            "there (truncated or replaced file); those thumbnails are not shown")
    return found, problems
