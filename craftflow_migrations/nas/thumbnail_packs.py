"""Thumbnails in append-only pack files of a folder, indexed by ``design_thumbnails`` rows.

Each batch step appends the thumbnails it makes to one pack file of its own
(``<folder>/<yyyy-mm>/<uuid>.pack``), and its rows in PostgreSQL say where each one lies
(pack, offset, length). A record is a 40-byte header (``CFT1``, the file's raw sha256, the
length) and the bytes, so a pack describes itself: a reader checks that the header names the
sha256 it asked for, and a pack can be verified or re-indexed without the database (where a
header's magic is missing, zeros pad a flush out to the next 4 KB boundary).

Durability is ordered: a flush writes its records and ``fdatasync``s the pack before the
transaction that indexes them commits. A step killed in between leaves bytes no row points
at, never a row pointing at bytes that are not there.

Why a folder: kept in PostgreSQL, a 9 KB thumbnail cost the machine 0.1-0.18 ms (TOAST chunks,
their index, WAL, the COPY stream), as much as hashing the small file it shows; appended to a
pack it is a few microseconds of one write a flush (``benchmarks/README.md``, items 43-44).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

MAGIC = b"CFT1"
HEADER = struct.Struct(">4s32sI")  # magic, the file's sha256 (raw), the thumbnail's length
SETTING = "CRAFTFLOW_THUMBNAIL_DIR"
# What PackWriter names its packs; an index row naming anything else is never opened.
PACK_NAME = re.compile(r"\d{4}-\d{2}/[0-9a-f]{32}\.pack")


class ThumbnailStoreError(RuntimeError):
    """The thumbnail folder cannot be written; the message names it, the setting and the fix."""


class PackedThumbnail(NamedTuple):
    """Where one thumbnail lies: its pack (relative to the folder), the offset of its bytes, their
    length; in the order of its ``design_thumbnails`` columns, so it is the row COPY sends."""

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

    Where the file system takes it, records go around the page cache (``O_DIRECT``): a flush's
    records are copied into one page-aligned buffer and written from it, each flush starting on
    a :data:`ALIGN` boundary (its tail zero-padded, which no index row points at). Through the
    page cache, a 9 KB thumbnail cost 3-6 us of system time to cache, write back and drop
    again; written directly, under 1, for 1-2 us more of copying it into the buffer, and no
    writeback left to the kernel's threads (``benchmarks/README.md``, item 44). Elsewhere (a
    file system without direct I/O, a device with blocks larger than :data:`ALIGN`), or with
    ``direct=False``, records go through the page cache with ``pwritev``, back to back.

    ``register`` is called with the pack's name before the file is created (``store.register_pack``:
    the prune deletes only packs its own database registered).
    """

    def __init__(self, folder: Path, direct: bool = True, register: Callable[[str], None] | None = None):
        self.folder = folder
        self.direct = direct  # tried at open; off where the file system refuses O_DIRECT
        self.register = register
        self.name: str | None = None
        self.fd: int | None = None
        self.size = 0
        self._buffer: mmap.mmap | None = None

    def _open(self) -> None:
        month = datetime.now(timezone.utc).strftime("%Y-%m")
        name = f"{month}/{uuid.uuid4().hex}.pack"
        path = self.folder / name
        if self.register is not None:
            self.register(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            # The new name itself must survive a crash, or a committed row would point at nothing.
            _fsync_folder(path.parent)
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.name = name
        if self.direct:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
                self._buffer = mmap.mmap(-1, DIRECT_BUFFER_BYTES)  # page-aligned, as O_DIRECT needs
            except (OSError, AttributeError):  # EINVAL: this file system has no direct I/O
                self.direct = False

    def append_all(self, thumbnails: Iterable[tuple[str, bytes]]) -> list[PackedThumbnail]:
        """Append every ``(sha256, bytes)`` and make them durable (``fdatasync``) before returning."""
        thumbnails = list(thumbnails)
        if not thumbnails:
            return []
        if self.fd is None:
            self._open()
        try:
            if self.direct:
                try:
                    placed, end = _write_direct(self.fd, self.name, thumbnails, self.size, self._buffer)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # A device whose blocks are larger than ALIGN: the page cache from here on.
                    self._stop_direct()
                    return self.append_all(thumbnails)
                os.fdatasync(self.fd)
            else:
                placed, end = _write_buffered(self.fd, self.name, thumbnails, self.size)
                os.fdatasync(self.fd)
                _drop_cached(self.fd, end)
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.size = end
        return placed

    def _stop_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
        self._free_buffer()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._free_buffer()

    def _free_buffer(self) -> None:
        if self._buffer is not None:
            try:
                self._buffer.close()
            except BufferError:  # a failed write's traceback still holds a view of it: freed with that
                pass
            self._buffer = None


# Direct writes start, and are as long as, a multiple of this (the logical block size of any
# disk, 512 or 4096, divides it).
ALIGN = 4096
# One flush goes out in writes of at most this much; small enough to hold per batch step, large
# enough that the disk is not waited on a write at a time.
DIRECT_BUFFER_BYTES = 4 * 1024 * 1024


def _write_direct(fd: int, pack: str, thumbnails: list[tuple[str, bytes]], offset: int,
                  buffer: mmap.mmap) -> tuple[list[PackedThumbnail], int]:
    """Records from ``offset`` (a multiple of :data:`ALIGN`), built in ``buffer`` and written
    from it each time it fills; the last write zero-padded to :data:`ALIGN`. Returns where each
    record lies and where the pack now ends."""
    view = memoryview(buffer)
    capacity, filled, start = len(buffer), 0, offset  # start: the file offset of the buffer's first byte
    placed: list[PackedThumbnail] = []

    def put(piece: bytes) -> None:  # the slow way, for the record that crosses a full buffer
        nonlocal filled, start
        rest = memoryview(piece)
        while rest:
            take = min(len(rest), capacity - filled)
            view[filled:filled + take] = rest[:take]
            filled, rest = filled + take, rest[take:]
            if filled == capacity:
                _pwrite_all(fd, view, start)
                start, filled = start + capacity, 0

    try:
        for sha, data in thumbnails:
            placed.append(PackedThumbnail(sha, pack, start + filled + HEADER.size, len(data)))
            end = filled + HEADER.size + len(data)
            if end <= capacity:
                HEADER.pack_into(buffer, filled, MAGIC, bytes.fromhex(sha), len(data))
                view[filled + HEADER.size:end] = data
                filled = end
            else:
                put(HEADER.pack(MAGIC, bytes.fromhex(sha), len(data)))
                put(data)
        padded = -(-filled // ALIGN) * ALIGN
        view[filled:padded] = bytes(padded - filled)
        _pwrite_all(fd, view[:padded], start)
        return placed, start + padded
    finally:
        view.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _write_buffered(fd: int, pack: str, thumbnails: list[tuple[str, bytes]],
                    offset: int) -> tuple[list[PackedThumbnail], int]:
    """Records back to back from ``offset``, each piece straight from its own buffer
    (``pwritev``, IOV_MAX pieces a call). Returns where each lies and where the pack now ends.

    Joined first, a flush's 46 MB of small files' thumbnails was one more buffer to fault in
    and copy: 28 us of system time a 9 KB thumbnail, against 18-24 this way.
    """
    pieces: list[bytes] = []
    placed: list[PackedThumbnail] = []
    end = offset
    for sha, data in thumbnails:
        pieces.append(HEADER.pack(MAGIC, bytes.fromhex(sha), len(data)))
        pieces.append(data)
        placed.append(PackedThumbnail(sha, pack, end + HEADER.size, len(data)))
        end += HEADER.size + len(data)
    iov_max = os.sysconf("SC_IOV_MAX")
    for first in range(0, len(pieces), iov_max):
        group = pieces[first:first + iov_max]
        written = os.pwritev(fd, group, offset)
        offset += written
        if written < sum(len(p) for p in group):  # short (a signal, a nearly full disk): the rest in turn
            _pwrite_all(fd, memoryview(b"".join(group))[written:], offset)
            offset += sum(len(p) for p in group) - written
    return placed, end


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
