"""The interface every NAS backend implements: list one folder, read one file, by raw path.

Paths are bytes relative to the base path, with ``/`` separators: names on a NAS are bytes,
and not every name is UTF-8. What to do with each entry (hidden names, links, loops,
unreadable folders) is decided once, in ``listing.py``, for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal


class NasError(RuntimeError):
    """The NAS cannot be reached or read; the message names the host and what to do."""


class HostKeyError(NasError):
    pass


@dataclass(frozen=True, slots=True)
class Entry:
    """One folder entry, as ``lstat`` sees it: a link is a link, never what it points to."""

    name: bytes
    kind: Literal["file", "dir", "link", "other"]
    size: int
    mtime_us: int  # microseconds since the epoch: PostgreSQL's precision, compared as integers
    error: OSError | None = None  # why the entry could not be examined (kind "other")


class NasClient(ABC):
    description: str
    # Every read waits on the server (a round trip at least): small files go to the read-ahead
    # thread from the first, in groups (read_each), instead of being timed inline first.
    reads_wait: bool = False
    # ``will_read`` makes later reads cheaper without a round trip of its own (a local disk's
    # read-ahead): reads seen waiting try it for a window before the read-ahead thread.
    announces_reads: bool = False

    @abstractmethod
    def scandir(self, rel: bytes) -> list[Entry]:
        """The entries of one folder (``b""`` is the base). Raises ``OSError`` for that folder."""

    @abstractmethod
    def read(self, rel: bytes, size: int | None = None) -> bytes:
        """A whole file. ``OSError`` for that file; :class:`NasError` when the NAS is gone.

        ``size`` is the listed size, when known: a hint that lets a backend read a small file
        in fewer round trips. The bytes returned are always the whole file as it is now.
        """

    def scandir_each(self, rels: Sequence[bytes]) -> list[list[Entry] | OSError]:
        """``scandir`` of each folder, in order, an ``OSError`` standing for that folder's.

        A backend may list them with their requests in flight together; this one lists a
        folder at a time. Anything but an ``OSError`` (a lost connection) is raised.
        """
        return [self._scandir_or_error(rel) for rel in rels]

    def _scandir_or_error(self, rel: bytes) -> list[Entry] | OSError:
        try:
            return self.scandir(rel)
        except OSError as exc:
            return exc

    def read_each(self, files: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes | None, Exception | None]]:
        """``(bytes, None)`` or ``(None, error)`` for each ``(path, listed size)``, in order.

        Never raises for a file: what ``read`` would raise comes back as that file's error
        (a lost connection as every later file's). A backend may overlap the reads; this
        one reads a file at a time.
        """
        for item in files:
            yield self._read_or_error(item)

    def _read_or_error(self, item: tuple[bytes, int]) -> tuple[bytes | None, Exception | None]:
        try:
            return self.read(*item), None
        except Exception as exc:  # noqa: BLE001 - the caller decides (importer.read_failure)
            return None, exc

    def _small_in_groups(self, files: Iterable[tuple[bytes, int]], small_below: int, group_size: int,
                         read_group: Callable[[list[tuple[bytes, int]]], Iterable[tuple[bytes | None, Exception | None]]],
                         ) -> Iterator[tuple[bytes | None, Exception | None]]:
        """``read_each`` for a backend that reads small files in groups: files under
        ``small_below`` bytes in groups of ``group_size`` through ``read_group``, a larger one
        alone, in order. Lazily, as the read-ahead thread's budget asks."""
        group: list[tuple[bytes, int]] = []
        for rel, size in files:
            if size < small_below:
                group.append((rel, size))
                if len(group) == group_size:
                    yield from read_group(group)
                    group = []
                continue
            if group:
                yield from read_group(group)
                group = []
            yield self._read_or_error((rel, size))
        if group:
            yield from read_group(group)

    def will_read(self, rels: Sequence[bytes]) -> None:  # noqa: B027 - a hint most backends have no use for
        """These files will be read soon, in this order: a backend may start fetching them now."""

    def reads_seen_waiting(self) -> None:  # noqa: B027 - most backends know it already (reads_wait)
        """The caller timed this client's reads and saw them wait on the NAS (a share mounted
        across a network, a cold disk): a backend may overlap the reads from now on."""

    @abstractmethod
    def resolve(self, rel: bytes) -> bytes | None:
        """Where a link leads, relative to the base (``b"../x"`` when outside); None if broken or a loop."""

    def resolve_each(self, rels: Sequence[bytes]) -> list[bytes | None]:
        """``resolve`` of each link, in order. A backend may resolve them with their requests
        in flight together; this one resolves a link at a time."""
        return [self.resolve(rel) for rel in rels]

    def connected(self) -> bool:
        """Whether the connection still works (a failed read is then the file's fault)."""
        return True

    def close(self) -> None:  # noqa: B027 - a local folder has nothing to close
        """Release the connection, if the backend has one."""

    def __enter__(self) -> NasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
