"""A NAS mounted over SMB/NFS, or a plain folder for demos and tests."""

from __future__ import annotations

import errno
import os
import re
import stat
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TypeVar

from .base import Entry, NasClient, NasError

T = TypeVar("T")
R = TypeVar("R")

# Folder listings (or link resolutions) made in turn and timed before deciding whether the
# share waits on a network.
TIMED_CALLS = 16
# The share waits when less than this share of the median timed call's wall time was the
# calling thread's own CPU (system calls included).
WAITING_SHARE = 0.5
# Calls at once on a share that waits: the mount's client (cifs, NFS, sshfs) keeps them all in
# flight on its connection, as the SFTP backend keeps 64 folders' or 32 files' requests.
THREADS = 8
# Files under this size are read in groups on the threads; a larger one is read alone (the
# read-ahead thread's budget counts whole files, and one large read keeps a mount busy).
GROUPED_READ_BYTES = 1024 * 1024
READ_GROUP = 32
# How a file is opened to be read (or announced): O_NOFOLLOW, so a file swapped for a link after
# the listing is not followed out of the base; O_NONBLOCK, so one swapped for a named pipe is
# refused, not waited on forever.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
# File systems on a local device (or in memory), where an announced file is read ahead by the
# kernel without a round trip. A share mounted across a network (nfs, cifs, fuse.sshfs) is not
# one, nor is a type not listed here: the importer then treats it as it always did.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
                               "bcachefs", "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs3", "hfsplus"})


def filesystem_in(mountinfo: bytes, path: bytes) -> str | None:
    """The type of the file system holding the absolute, resolved ``path``, from the text of
    ``/proc/self/mountinfo`` (the innermost mount; the latest one mounted over the same point)."""
    best, found = -1, None
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if b"-" not in fields[6:]:
            continue
        # Spaces, tabs, newlines and backslashes in a mount point are written as octal escapes.
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        inside = path == point or path.startswith(point.rstrip(b"/") + b"/")
        if inside and len(point) >= best:
            best, found = len(point), fields[fields.index(b"-", 6) + 1].decode(errors="replace")
    return found


def filesystem_of(path: bytes) -> str | None:
    """The file system type of ``path`` on this machine; None where it cannot be told (no /proc)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return filesystem_in(f.read(), os.path.realpath(path))
    except OSError:
        return None


class LocalNasClient(NasClient):
    """A folder of this machine, which may be a NAS share mounted across a network.

    A mounted share answers each folder, and each small file, after a round trip or a few
    (open, read, close), so calls made one after another cost one wait each: threads let the
    waits overlap, since ``os.scandir``, ``stat`` and ``read`` let go of the GIL. On a local
    disk the page cache answers in microseconds and a thread's hand-over would cost more than
    the call. So the first TIMED_CALLS folder listings (and link resolutions) are made in turn
    and timed, and later ones go to threads only if those waited (their wall time mostly not
    the thread's own CPU). Reads are not timed here: while a batch hashes on another thread, a
    read's wall time includes waiting for the GIL, which says nothing about the share. They go
    to the threads once the share is known to wait, from the listing or from the importer's
    own timing of its reads (``reads_seen_waiting``, GIL-aware).
    """

    def __init__(self, base_path: str | os.PathLike[str]):
        self.base = os.fsencode(base_path)
        if not os.path.isdir(self.base):
            raise NasError(f"NAS_BASE_PATH {os.fsdecode(self.base)!r} is not a folder on this machine "
                           "(check NAS_BASE_PATH, or set QNAP_HOST to read it over SFTP)")
        self.real_base = os.path.realpath(self.base)
        self.description = f"local folder {os.fsdecode(self.base)}"
        self._timed: list[tuple[float, float]] = []  # (wall, thread CPU) of each timed call
        self.share_waits: bool | None = None  # decided from the timed calls
        self._pool: ThreadPoolExecutor | None = None

    @cached_property
    def announces_reads(self) -> bool:
        # Asked only once a batch's reads are seen slow: opening a client (each sensor tick's
        # listing) does not read /proc/self/mountinfo.
        return filesystem_of(self.base) in LOCAL_FILESYSTEMS

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(self.base, rel) if rel else self.base

    def scandir(self, rel: bytes) -> list[Entry]:
        out = []
        with os.scandir(self._abs(rel)) as entries:
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError as exc:
                    # A path past PATH_MAX (ENAMETOOLONG), a file gone since the READDIR.
                    out.append(Entry(e.name, "other", 0, 0, exc))
                    continue
                mode = st.st_mode
                kind = ("link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                        else "file" if stat.S_ISREG(mode) else "other")
                # st_mtime_ns // 1000, never the float st_mtime: a float does not round-trip.
                out.append(Entry(e.name, kind, st.st_size, st.st_mtime_ns // 1000))
        return out

    def _each(self, call: Callable[[T], R], items: Sequence[T], timed: bool = True) -> list[R]:
        """``call`` of each item, in order: timed in turn until the share is judged (``timed``),
        then on the threads where it waits."""
        out: list[R] = []
        while timed and self.share_waits is None and len(out) < len(items):
            wall, cpu = time.perf_counter(), time.thread_time()
            out.append(call(items[len(out)]))
            self._timed.append((time.perf_counter() - wall, time.thread_time() - cpu))
            if len(self._timed) >= TIMED_CALLS:
                # The median call, not the sum: a call that lost its core to another process
                # (or its vCPU to the host) looks like one that waited on the share.
                self.share_waits = statistics.median(cpu / wall if wall > 0 else 1.0
                                                     for wall, cpu in self._timed) < WAITING_SHARE
        rest = items[len(out):]
        if self.share_waits and len(rest) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="nas-share")
            return out + list(self._pool.map(call, rest))
        return out + [call(item) for item in rest]

    def scandir_each(self, rels: Sequence[bytes]) -> list[list[Entry] | OSError]:
        return self._each(self._scandir_or_error, rels)

    def read(self, rel: bytes, size: int | None = None) -> bytes:
        fd = os.open(self._abs(rel), _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file (replaced since the listing)")
            # One read of one byte more than its size: a file of that size is whole in one system
            # call and no file object (a buffered file's read took a second call, to see the end,
            # and 2-3 us more a small file). A short read, or a file grown since, reads on to the end.
            data = os.read(fd, st.st_size + 1)
            if len(data) == st.st_size:
                return data
            parts = [data]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def reads_seen_waiting(self) -> None:
        self.share_waits = True

    def will_read(self, rels: Sequence[bytes]) -> None:
        """Ask the kernel to read these files into the page cache now (``POSIX_FADV_WILLNEED``),
        so that their reads, made later in turn, find them there: the disk's waits overlap the
        hashing without a thread's hand-overs. A file that cannot be opened is left to its read."""
        for rel in rels:
            try:
                fd = os.open(self._abs(rel), _READ_FLAGS)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a file system without the advice
            finally:
                os.close(fd)

    def read_each(self, files: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes | None, Exception | None]]:
        """Small files in groups of READ_GROUP, on the threads where the share waits; a large
        file alone, in the calling thread."""
        return self._small_in_groups(files, GROUPED_READ_BYTES, READ_GROUP,
                                     lambda group: self._each(self._read_or_error, group, timed=False))

    def resolve(self, rel: bytes) -> bytes | None:
        try:
            real = os.path.realpath(self._abs(rel), strict=True)
        except (OSError, RuntimeError):
            return None
        return os.path.relpath(real, self.real_base)

    def resolve_each(self, rels: Sequence[bytes]) -> list[bytes | None]:
        # Resolving is a chain of lstat calls: on a share that waits, a round trip each.
        return self._each(self.resolve, rels)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
