"""Heavy data migrations, safely: keyset batches, a checkpoint per batch, a throttle.

    from craftflow_migrations.schema.batched import batched_update

    KIND = "complex"
    TRANSACTIONAL = False

    def upgrade(connection):
        batched_update(connection, name="users_display_name", table="users",
                       todo="display_name IS NULL",
                       set_="display_name = trim(t.first_name || ' ' || t.last_name)")

- **Keyset, never OFFSET**: each batch is the next ``batch_size`` rows with a key above the
  last batch's, among rows still to do. ``OFFSET`` paging over rows that the update itself
  removes from its filter skips rows: after batch 1 fixes rows 1-1000, they leave the
  ``WHERE display_name IS NULL`` set, so ``OFFSET 1000`` starts at what was row 2001 and
  rows 1001-2000 are never touched.
- **One statement per batch** selects the batch, updates it and saves the checkpoint
  (last key, rows done), so each commit moves data and checkpoint together: a process killed
  with -9 loses at most the batch in flight and the next run resumes after the checkpoint.
- **Duty cycle**: after a batch that took *t* seconds, the helper sleeps
  ``t * (1 - duty_cycle) / duty_cycle``, so at 0.5 the live database gets half of the time.
- **Progress**: a line every few seconds (rows, %, rows/s, ETA) and totals that the job's op
  reports as Dagster metadata.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

log = logging.getLogger("craftflow_migrations.batched")

CHECKPOINTS = "craftflow_migration_checkpoints"


@dataclass
class BatchedResult:
    name: str
    rows_seen: int = 0
    rows_updated: int = 0
    batches: int = 0
    seconds: float = 0.0
    resumed_after: int | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_seen / self.seconds if self.seconds > 0 else 0.0


_RESULTS: ContextVar[list[BatchedResult] | None] = ContextVar("batched_results", default=None)


@contextmanager
def collect_results() -> Iterator[list[BatchedResult]]:
    """What every ``batched_update`` of the block did (the job's op turns it into metadata)."""
    results: list[BatchedResult] = []
    token = _RESULTS.set(results)
    try:
        yield results
    finally:
        _RESULTS.reset(token)


def ensure_checkpoints(connection: Connection) -> None:
    connection.execute(text(f"""
        CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (
            name        text PRIMARY KEY,
            last_id     bigint NOT NULL,
            rows_done   bigint NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
    """))


def batched_update(connection: Connection, *, name: str, table: str, set_: str, todo: str = "TRUE",
                   key: str = "id", batch_columns: str = "", update_where: str = "TRUE", batch_size: int = 5000,
                   duty_cycle: float = 0.5, logger: logging.Logger | None = None,
                   progress_every_s: float = 5.0) -> BatchedResult:
    """Update ``table`` in keyset batches of rows matching ``todo``; resumable, throttled.

    ``set_`` and ``update_where`` see the row as ``t`` and the batch as ``b`` (``b.k`` is the
    key, plus any ``batch_columns``, e.g. ``"regexp_match(label, '...') AS m"``). Needs a
    ``TRANSACTIONAL = False`` migration: each batch commits on its own.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}): 0 would convert nothing")
    if not 0 < duty_cycle <= 1:
        raise ValueError(f"duty_cycle must be in (0, 1] (got {duty_cycle})")
    logger = logger or log
    ensure_checkpoints(connection)
    checkpoint = connection.execute(text(f"SELECT last_id, rows_done FROM {CHECKPOINTS} WHERE name = :n"),
                                    {"n": name}).first()
    after, done = (checkpoint.last_id, checkpoint.rows_done) if checkpoint else (0, 0)
    remaining = connection.execute(text(f"SELECT count(*) FROM {table} t WHERE t.{key} > :after AND ({todo})"),
                                   {"after": after}).scalar()
    result = BatchedResult(name, resumed_after=after if checkpoint else None)
    if checkpoint:
        logger.info(f"Resuming {name} after {key} {after} ({done} rows done, {remaining} to go)")
    else:
        logger.info(f"{name}: {remaining} rows to update in batches of {batch_size}")
    extra = f", {batch_columns}" if batch_columns else ""
    statement = text(f"""
        WITH b AS (
            SELECT t.{key} AS k{extra} FROM {table} t
            WHERE t.{key} > :after AND ({todo}) ORDER BY t.{key} LIMIT :batch_size
        ),
        updated AS (
            UPDATE {table} t SET {set_} FROM b WHERE t.{key} = b.k AND ({update_where}) RETURNING 1
        ),
        saved AS (
            INSERT INTO {CHECKPOINTS} (name, last_id, rows_done, updated_at)
            SELECT :name, max(k), :done + count(*), now() FROM b HAVING count(*) > 0
            ON CONFLICT (name) DO UPDATE SET last_id = EXCLUDED.last_id, rows_done = EXCLUDED.rows_done,
                                             updated_at = now()
            RETURNING last_id
        )
        SELECT (SELECT count(*) FROM b) AS seen, (SELECT count(*) FROM updated) AS updated,
               (SELECT max(last_id) FROM saved) AS last_id
    """)
    started = last_line = time.monotonic()
    while True:
        batch_started = time.monotonic()
        row = connection.execute(statement, {"after": after, "batch_size": batch_size, "name": name,
                                             "done": done}).one()
        if row.seen == 0:
            break
        took = time.monotonic() - batch_started
        after, done = row.last_id, done + row.seen
        result.rows_seen += row.seen
        result.rows_updated += row.updated
        result.batches += 1
        now = time.monotonic()
        if now - last_line >= progress_every_s:
            last_line = now
            rate = result.rows_seen / (now - started)
            eta = (remaining - result.rows_seen) / rate if rate > 0 else 0.0
            logger.info(f"{name}: {result.rows_seen}/{remaining} rows ({100 * result.rows_seen / max(remaining, 1):.0f}%),"
                        f" {rate:,.0f} rows/s, ETA {max(eta, 0):.0f}s")
        if duty_cycle < 1:
            time.sleep(took * (1 - duty_cycle) / duty_cycle)
    connection.execute(text(f"DELETE FROM {CHECKPOINTS} WHERE name = :n"), {"n": name})
    result.seconds = time.monotonic() - started
    logger.info(f"{name} done: {result.rows_seen} rows in {result.batches} batches ({result.rows_updated} updated), "
                f"{result.rows_per_s:,.0f} rows/s")
    results = _RESULTS.get()
    if results is not None:
        results.append(result)
    return result
