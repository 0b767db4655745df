"""Import one batch of files: fetch, hash, upsert. Plain Python, no Dagster.

A batch may hold files of several partitions (a run importing many folders balances its
batches across all of them); counts are kept per partition.

Files are fetched ahead on a thread while the current one is hashed where reads wait (large
files, SFTP, a share that answers slowly), and read inline where the thread would cost more
than it hides (:func:`fetch_in_order`). Rows are committed every few files, which is what makes
a killed run resumable: committed files are unchanged on the next scan and are not fetched again.

What one file does never stops the batch: a file that cannot be read (permissions, gone
since the listing) or decoded is that file's recorded failure. Only a NAS that stops
answering fails the batch, which the asset retries.

Memory is bounded: the prefetch thread holds at most ``prefetch_bytes`` of files not yet
hashed (always at least one file), so a step holds the file it hashes, at most
``max(prefetch_bytes, largest file)`` read ahead, and one decoded image.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import partial

from sqlalchemy.engine import Engine

from ..settings import NasSettings, get_settings
from . import store
from .clients.base import NasClient, NasError
from .hashing import DecodeLimits, ImageFacts, describe_image
from .listing import NasFile
from .memory import keep_freed_memory
from .names import shown
from .thumbnail_packs import PackWriter

MB = 1024 * 1024
log = logging.getLogger("craftflow_migrations.nas")


@dataclass
class Counts:
    imported: int = 0
    failed: int = 0
    skipped: int = 0  # already imported by an earlier attempt of the batch
    bytes_read: int = 0


def sum_counts(counts: Iterable[Counts]) -> Counts:
    """Field by field: one batch's partitions, or one partition's batches."""
    counts = list(counts)
    return Counts(*(sum(getattr(c, f.name) for c in counts) for f in fields(Counts)))


@dataclass
class BatchResult:
    label: str
    files: int = 0
    seconds: float = 0.0
    partitions: dict[str, Counts] = field(default_factory=dict)
    _by_folder: dict[tuple[str, str], Counts] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total(self) -> Counts:
        """The batch's counts: the sum over its partitions."""
        return sum_counts(self.partitions.values())

    @property
    def mb_per_s(self) -> float:
        return self.total.bytes_read / MB / self.seconds if self.seconds > 0 else 0.0

    def counts(self, f: NasFile) -> Counts:
        """This file's partition's counts, to add to."""
        # By folder first: building the partition key for each of 100,000 files cost 0.01 ms each.
        part = self._by_folder.get((f.shop, f.template))
        if part is None:
            part = self._by_folder[(f.shop, f.template)] = self.partitions.setdefault(f.key, Counts())
        return part


class Progress:
    """Log lines with files, MB, MB/s and ETA, at most every ``every_s`` seconds."""

    def __init__(self, label: str, total_files: int, total_bytes: int, logger, every_s: float = 5.0):
        self.label, self.total_files, self.total_bytes = label, total_files, total_bytes
        self.logger, self.every_s = logger, every_s
        self.started = self.last = time.monotonic()
        self.files = self.bytes = 0

    def advance(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every_s or self.files == self.total_files:
            self.last = now
            self.logger.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.bytes / MB / elapsed
        left = (self.total_bytes - self.bytes) / MB
        eta = left / rate if rate > 0 else 0.0
        return (
            f"{self.label}: {self.files}/{self.total_files} files, "
            f"{self.bytes / MB:,.1f}/{self.total_bytes / MB:,.1f} MB, {rate:,.1f} MB/s, ETA {eta:,.0f}s"
        )


class ReadAhead:
    """Fetch files on a thread, holding at most ``budget`` bytes not yet handed back.

    Hand-over is by the list, not by the file: the hashing thread takes everything ready at
    once, and each side wakes the other only when it is waiting. With 100,000 small files a
    wake-up per file (a thread switch each) cost more than reading them.
    """

    def __init__(self, client: NasClient, files: Sequence[NasFile], budget: int):
        self.client, self.files, self.budget = client, files, budget
        self.cond = threading.Condition()
        self.ready: list[tuple[NasFile, bytes | None, BaseException | None]] = []
        self.held = 0
        self.done = False
        self.stopped = False
        self.consumer_waiting = self.producer_waiting = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="nas-read-ahead")

    def _run(self) -> None:
        # Lazily: a backend that overlaps reads takes a few files ahead of the budget (SFTP:
        # at most PIPELINED_FILES small ones, 8 MB).
        results = self.client.read_each((f.rel, f.size) for f in self.files)
        for f in self.files:
            with self.cond:
                # Always at least one file, however large; then only what fits the budget.
                while not (self.stopped or self.held == 0 or self.held + f.size <= self.budget):
                    self.producer_waiting = True
                    self.cond.wait()
                    self.producer_waiting = False
                if self.stopped:
                    return
                self.held += f.size
            try:
                item = (f, *next(results))
            except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread to decide
                item = (f, None, exc)
            with self.cond:
                self.ready.append(item)
                if self.consumer_waiting:
                    self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def __iter__(self):
        self.thread.start()
        try:
            while True:
                with self.cond:
                    while not (self.ready or self.done):
                        self.consumer_waiting = True
                        self.cond.wait()
                        self.consumer_waiting = False
                    if not self.ready:
                        return
                    items, self.ready = self.ready, []
                done = 0
                for item in items:
                    yield item
                    done += item[0].size
                    # Bytes go back to the budget at the end of the list, or at once when the
                    # reader waits for them: a lock round per small file costs more than its read.
                    if self.producer_waiting:
                        with self.cond:
                            self.held -= done
                            done = 0
                            self.cond.notify_all()
                with self.cond:
                    self.held -= done
                    if self.producer_waiting:
                        self.cond.notify_all()
        finally:
            with self.cond:
                self.stopped = True
                self.cond.notify_all()
            self.thread.join(timeout=30)


class _Announcer:
    """Announces files a window ahead of their reads (``NasClient.will_read``) once a window's
    reads are seen cold, and stops if that made the next window's reads no cheaper."""

    def __init__(self, client: NasClient, files: Sequence[NasFile], window: int, cold_read_s: float):
        self.client, self.files, self.window, self.cold_read_s = client, files, window, cold_read_s
        self.until = -1  # files[:until] were announced; -1 not started, -2 stopped (no use)
        self.cold = 0.0  # the median read of the window that started it
        self.cost = 0.0  # seconds spent announcing the files of the window after it
        self.announced = 0

    def judge(self, median_read: float, i: int) -> None:
        if self.until == -1 and median_read > self.cold_read_s:
            self.until, self.cold = i, median_read
        elif self.until >= 0 and self.cold and self.announced:
            if median_read + self.cost / self.announced >= self.cold:
                self.until = -2  # a share whose opens wait too: announcing only doubled them
            self.cold = 0.0  # judged once

    @property
    def on_trial(self) -> bool:
        """Announcing started with this window and is judged by the next one."""
        return self.until >= 0 and self.cold > 0

    def announce(self, i: int) -> None:
        if 0 <= self.until < i + self.window:
            rels = [g.rel for g in self.files[self.until:i + 2 * self.window]]
            started = time.perf_counter()
            self.client.will_read(rels)
            if self.cold:
                self.cost += time.perf_counter() - started
                self.announced += len(rels)
            self.until = i + 2 * self.window


# A small file's read from the page cache takes 0.01-0.013 ms here (open, fstat, read, close);
# from a disk whose cache is cold, 0.065. A window of reads whose median is over this is
# announced ahead (``NasClient.will_read``).
COLD_READ_S = 0.03e-3


def fetch_in_order(client: NasClient, files: Sequence[NasFile], budget: int, may_thread: bool = True,
                   threaded_from_bytes: int = 256 * 1024, window_files: int = 64, waiting_share: float = 0.5,
                   cold_read_s: float = COLD_READ_S, fair: Callable[[], bool] | None = None,
                   ) -> Iterator[tuple[NasFile, bytes | None, BaseException | None]]:
    """``(file, data, error)`` for each file in order, read inline or by :class:`ReadAhead`.

    The thread pays where reads wait. Large files (a batch averaging ``threaded_from_bytes``
    or more) always go through it, 3-4% faster for large designs over SFTP, and so does every
    file of a client whose reads all wait on a server (``NasClient.reads_wait``: SFTP, 13%
    faster through the thread over loopback, which reads its small files in groups; timed
    inline first, a window of 64 files paid two round trips each, and a window whose round
    trips came back fast enough could keep a whole batch inline).

    For small files in a local page cache the thread costs more than it hides: its hand-overs
    of the GIL cost 0.05 ms a file against a 0.01 ms read. So small files of a local folder
    are read inline and timed, and the rest go through the thread as soon as a window of
    ``window_files`` shows them waiting: its fastest quarter of reads over ``waiting_share``
    of the median file's other work (a share mounted across a network, a cold disk). A folder
    only partly in the page cache stays inline: with two batch steps on two cores, a folder
    whose other half came from the disk in 0.1 ms (judged by the median) moved to the
    thread, whose hand-overs cost that step 7-15% more CPU while the other step had the core
    during the waits anyway. Where the reads are slower than the hashing itself, one thread
    reading ahead would fall behind, and the backend is told (``reads_seen_waiting``: a mounted
    share then reads small files on several threads).

    Reads that come from the disk rather than the page cache, but too fast to be worth the
    thread (a window's median over ``cold_read_s``: a local disk with a cold cache), make the
    files a window ahead be announced to the client (``will_read``: the kernel's read-ahead of
    each file), so the disk works while the current files hash. With two batch steps both
    waiting on a cold disk, the cores stood idle for about 0.05 ms a small file. On a local
    file system (``NasClient.announces_reads``) announcing is tried for one window before the
    thread is, however slow the reads: the first window after a cache was dropped read 0.28 ms
    a file on one machine, over the thread's bar, and the thread's hand-overs then cost a batch
    40-80% more than announcing did. Announcing that made the next window's reads no cheaper
    stops, and the thread follows. A share mounted across a network goes to the thread after
    its first window, as before.

    A read that waited for the GIL says nothing about the NAS: a quantile shrugs off a few,
    and files read while ``fair()`` is false are not timed at all. While the batch's writer
    encodes a flush, every read (a system call, which lets go of the GIL) waits up to 5 ms to
    get it back, and a window inside one flush moved a page-cache folder to the thread (0.07 ms
    a file dearer, read back to back). Errors are handed over as the thread hands them, for
    :func:`read_failure` to decide. ``may_thread=False`` (the sequential mode) always reads
    inline.
    """
    if not may_thread:
        window_files = len(files) + 1
    elif client.reads_wait or sum(f.size for f in files) >= threaded_from_bytes * len(files) > 0:
        yield from ReadAhead(client, files, budget)
        return
    reads: list[float] = []
    work: list[float] = []
    ahead = _Announcer(client, files, window_files, cold_read_s)
    for i, f in enumerate(files):
        if len(reads) >= window_files:
            # The second quartile is the median: one sort of the window's reads for both.
            slow, median_read, _ = statistics.quantiles(reads, n=4)
            hashing = statistics.median(work)
            ahead.judge(median_read, i)
            if slow > waiting_share * hashing and not (client.announces_reads and ahead.on_trial):
                if slow > hashing:
                    # Reads slower than the hashing: one thread reading ahead would fall behind,
                    # so the backend may overlap them (a mounted share's threads). Only then: a
                    # misjudged page-cache folder costs a thread's hand-overs, not nine.
                    client.reads_seen_waiting()
                yield from ReadAhead(client, files[i:], budget)
                return
            reads, work = [], []
        ahead.announce(i)
        timed = fair is None or fair()
        started = time.perf_counter()
        try:
            item = (f, client.read(f.rel, f.size), None)
        except Exception as exc:  # noqa: BLE001 - decided by read_failure, as for the thread's reads
            item = (f, None, exc)
        read = time.perf_counter()
        yield item
        if timed and (fair is None or fair()):
            reads.append(read - started)
            work.append(time.perf_counter() - read)


def read_failure(client: NasClient, f: NasFile, exc: BaseException) -> str:
    """This file's error, or raise :class:`NasError` when the NAS itself is gone."""
    if isinstance(exc, OSError) and client.connected():
        why = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, FileNotFoundError):
            return "file disappeared before it could be read"
        return f"could not be read: {why}"
    raise NasError(f"Lost the NAS connection while reading {shown(f.path)} "
                   f"({client.description}): {exc or type(exc).__name__}") from exc


def import_batch(client: NasClient, engine: Engine, files: Sequence[NasFile], listed_at: datetime,
                 settings: NasSettings | None = None, label: str = "batch",
                 logger: logging.Logger | None = None, pipelined: bool = True,
                 flush_bytes: int = 256 * MB, flush_every_s: float = 2.0, prefetch_bytes: int = 256 * MB,
                 on_file: Callable[[NasFile], None] | None = None,
                 had_rows: Collection[str] | None = None) -> BatchResult:
    """Fetch, hash and store ``files``. Bad files are recorded; an unreachable NAS raises.

    ``had_rows`` are the paths that had a row when the run's listing was diffed (the plan
    step knows them: the changed files). Given, as on a batch's first attempt, only the ids of
    the batch's shops are asked of the database first, and the other files' rows go straight in by COPY
    (:func:`store.upsert`). Without it (a retry, a re-execution) one query finds the rows
    already there, and files an earlier attempt committed are skipped (asking it for 20,000
    paths held the GIL 0.016 ms a file: psycopg2 quoting three arrays of strings).
    """
    settings = settings or get_settings().nas
    logger = logger or log
    keep_freed_memory()
    limits = DecodeLimits(settings.max_pixels, settings.decode_timeout_s)
    max_file_bytes = settings.max_file_mb * MB
    result = BatchResult(label)
    started = time.monotonic()

    with engine.connect() as conn:
        shop_ids = store.shop_ids(conn, {f.shop for f in files})  # rows go in linked to their shop
        # A retried batch skips what an earlier attempt already committed: one query for the batch.
        known = store.known_files(conn, files) if had_rows is None else None
    if known is not None:
        todo = []
        for f in files:
            row = known.get((f.shop, f.template, f.path))
            if row is not None and row.is_current(f, max_file_bytes):
                result.counts(f).skipped += 1
            else:
                todo.append(f)
        had_rows = {path for _, _, path in known}
    else:
        todo = list(files)
    progress = Progress(label, len(todo), sum(f.size for f in todo), logger)
    pending: list[store.DesignImageRow] = []  # rows of files the database already had a row for
    pending_fresh: list[store.DesignImageRow] = []  # and of files it had none for (a first import's)
    pending_thumbs: dict[str, bytes] = {}
    pending_bytes = 0
    last_flush = time.monotonic()
    # Commits run on a thread while the next files are hashed: waiting for the database
    # (its writes, the WAL flush at commit) would otherwise leave this core idle, 0.1 ms a
    # small file. One flush at a time: the next hand-over waits for the one before and
    # raises its error (a lost database fails the batch, which the asset retries).
    writer = ThreadPoolExecutor(1, thread_name_prefix="nas-writer")
    in_flight: Future | None = None
    # This attempt's own pack file (only the writer thread appends to it).
    packs = (PackWriter(settings.thumbnail_folder, register=partial(store.register_pack, engine))
             if settings.thumbnail_store == "folder" else None)

    def write(rows: list[store.DesignImageRow], fresh: list[store.DesignImageRow], thumbs: dict[str, bytes]) -> None:
        with engine.begin() as conn:
            # Thumbnails first, in the same transaction: a row never points at a missing picture.
            store.save_thumbnails(conn, thumbs, packs)
            store.upsert(conn, rows, fresh)

    def flush() -> None:
        nonlocal pending, pending_fresh, pending_thumbs, pending_bytes, last_flush, in_flight
        if in_flight is not None:
            in_flight.result()
        in_flight = (writer.submit(write, pending, pending_fresh, pending_thumbs)
                     if pending or pending_fresh else None)
        pending, pending_fresh, pending_thumbs, pending_bytes, last_flush = [], [], {}, 0, time.monotonic()

    def handle(f: NasFile, data: bytes | None, error: BaseException | None) -> None:
        nonlocal pending_bytes
        counts = result.counts(f)
        if error is not None:
            facts = ImageFacts(None, None, None, None, None, read_failure(client, f, error))
        else:
            facts = describe_image(data, limits)
            counts.bytes_read += len(data)
        if facts.error:
            counts.failed += 1
            logger.warning(f"{shown(f.path)}: {facts.error}")
        else:
            counts.imported += 1
        (pending if f.path in had_rows else pending_fresh).append(
            store.row_for(f, facts, listed_at, shop_id=shop_ids.get(f.shop)))
        if facts.thumbnail is not None:
            pending_thumbs[facts.sha256] = facts.thumbnail
        pending_bytes += f.size
        progress.advance(len(data or b""))
        if on_file:
            on_file(f)
        # Committed by count, size or time: a killed import loses at most a few seconds of work.
        if (len(pending) + len(pending_fresh) >= settings.commit_every or pending_bytes >= flush_bytes
                or time.monotonic() - last_flush >= flush_every_s):
            flush()

    def writer_idle() -> bool:
        return in_flight is None or in_flight.done()

    try:
        with writer:
            for f, data, error in fetch_in_order(client, todo, prefetch_bytes, may_thread=pipelined, fair=writer_idle):
                handle(f, data, error)
            flush()
            if in_flight is not None:
                in_flight.result()
    finally:
        if packs is not None:
            packs.close()
    result.files = len(files)
    result.seconds = time.monotonic() - started
    return result
