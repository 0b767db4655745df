"""Import one batch of files: fetch, hash, upsert. Plain Python, no Dagster.

A batch may hold files of several partitions (a run importing many folders balances its
batches across all of them); counts are kept per partition.

The next file is fetched on a thread while the current one is hashed, so network and
CPU overlap. Rows are committed every few files, which is what makes a killed run
resumable: committed files are unchanged on the next scan and are not fetched again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

from sqlalchemy.engine import Engine

from . import store
from .client import NasClient, NasFile, partition_key
from .hashing import ImageFacts, describe_image
from .memory import keep_freed_memory

MB = 1024 * 1024
log = logging.getLogger("craftflow_migrations.nas")


@dataclass
class Counts:
    imported: int = 0
    failed: int = 0
    skipped: int = 0
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

    @property
    def total(self) -> Counts:
        """The batch's counts: the sum over its partitions."""
        return sum_counts(self.partitions.values())

    @property
    def mb_per_s(self) -> float:
        return self.total.bytes_read / MB / self.seconds if self.seconds > 0 else 0.0

    def count(self, f: NasFile, **deltas: int) -> None:
        part = self.partitions.setdefault(partition_key(f.shop, f.template), Counts())
        for name, delta in deltas.items():
            setattr(part, name, getattr(part, name) + delta)


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


_DONE = object()


def _prefetch(client: NasClient, files: Sequence[NasFile], out: queue.Queue, stop: threading.Event) -> None:
    for f in files:
        if stop.is_set():
            return
        try:
            item = (f, client.read(f.path), None)
        except FileNotFoundError as exc:
            item = (f, None, exc)  # gone between listing and reading: recorded, not fatal
        except BaseException as exc:  # a dropped connection ends the batch; it is retried whole
            out.put((f, None, exc))
            return
        out.put(item)
    out.put(_DONE)


def import_batch(client: NasClient, engine: Engine, files: Sequence[NasFile], label: str = "batch",
                 logger: logging.Logger | None = None, pipelined: bool = True,
                 flush_every: int | None = None, flush_bytes: int = 256 * MB,
                 on_file: Callable[[NasFile], None] | None = None) -> BatchResult:
    """Fetch, hash and store ``files``. Bad files are recorded; an unreachable NAS raises."""
    logger = logger or log
    keep_freed_memory()
    # Rows commit every few files: a killed run loses at most those, and resumes after them.
    flush_every = flush_every or int(os.environ.get("NAS_COMMIT_EVERY", "16") or 16)
    result = BatchResult(label)
    started = time.monotonic()

    # A retried batch skips what an earlier attempt already committed.
    todo = []
    known: dict[tuple[str, str], dict[str, store.KnownRow]] = {}
    with engine.connect() as conn:
        for f in files:
            part = (f.shop, f.template)
            if part not in known:
                known[part] = store.known_rows(conn, *part)
            row = known[part].get(f.path)
            if row is not None and row.is_current(f):
                result.count(f, skipped=1)
            else:
                todo.append(f)
    progress = Progress(label, len(todo), sum(f.size for f in todo), logger)
    pending: list[dict] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        with engine.begin() as conn:
            store.upsert(conn, pending)
        pending, pending_bytes = [], 0

    def handle(f: NasFile, data: bytes | None, error: BaseException | None) -> None:
        nonlocal pending_bytes
        if error is not None and not isinstance(error, FileNotFoundError):
            raise error
        if data is None:
            facts = ImageFacts(None, None, None, None, None, "file disappeared before it could be read")
        else:
            facts = describe_image(data)
            result.count(f, bytes_read=len(data))
        if facts.error:
            result.count(f, failed=1)
            logger.warning(f"{f.path}: {facts.error}")
        else:
            result.count(f, imported=1)
        pending.append(store.row_for(f, facts))
        pending_bytes += f.size
        progress.advance(len(data or b""))
        if on_file:
            on_file(f)
        if len(pending) >= flush_every or pending_bytes >= flush_bytes:
            flush()

    if pipelined and len(todo) > 1:
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        worker = threading.Thread(target=_prefetch, args=(client, todo, q, stop), daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not _DONE:
                handle(*item)
        finally:
            stop.set()
            while not q.empty():
                q.get_nowait()
            worker.join(timeout=30)
    else:
        for f in todo:
            try:
                handle(f, client.read(f.path), None)
            except FileNotFoundError as exc:
                handle(f, None, exc)
    flush()
    result.files = len(files)
    result.seconds = time.monotonic() - started
    return result
