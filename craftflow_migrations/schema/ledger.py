"""The ledger of applied migrations and the runner lock.

The lock is a session-level advisory lock held on its own autocommit connection and
taken by polling ``pg_try_advisory_lock`` with a bounded wait. It is never an open
transaction, so ``CREATE INDEX CONCURRENTLY`` (which waits for every older
transaction) cannot deadlock against it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from .discovery import Migration

LEDGER_TABLE = "craftflow_schema_migrations"
# Arbitrary but fixed: every runner of every version must agree on it.
RUNNER_LOCK_KEY = 7_301_845_112_004_117


class RunnerLockTimeout(RuntimeError):
    pass


@dataclass(frozen=True)
class LedgerRow:
    name: str
    checksum: str
    kind: str
    applied_at: datetime
    duration_ms: int
    dagster_run_id: str | None


def ensure_ledger(conn: Connection) -> None:
    conn.execute(
        text(
            f"""
            CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
                name            text PRIMARY KEY,
                checksum        char(64) NOT NULL,
                kind            text NOT NULL CHECK (kind IN ('startup', 'complex')),
                applied_at      timestamptz NOT NULL DEFAULT now(),
                duration_ms     integer NOT NULL,
                dagster_run_id  text,
                repaired_at     timestamptz
            )
            """
        )
    )


def ledger_exists(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": LEDGER_TABLE}).scalar())


def ensure_ledger_table(engine: Engine) -> None:
    with engine.connect() as conn:
        if ledger_exists(conn):
            return
    # Two runners may race on CREATE TABLE IF NOT EXISTS (it is not atomic in PostgreSQL),
    # so it happens under the runner lock.
    with runner_lock(engine, wait_s=60):
        with engine.begin() as conn:
            ensure_ledger(conn)


def applied(conn: Connection) -> dict[str, LedgerRow]:
    if not ledger_exists(conn):
        return {}
    rows = conn.execute(
        text(
            f"SELECT name, checksum, kind, applied_at, duration_ms, dagster_run_id "
            f"FROM {LEDGER_TABLE} ORDER BY applied_at, name"
        )
    )
    return {r.name: LedgerRow(*r) for r in rows}


def record(conn: Connection, migration: Migration, duration_ms: int, run_id: str | None) -> None:
    conn.execute(
        text(
            f"""
            INSERT INTO {LEDGER_TABLE} (name, checksum, kind, duration_ms, dagster_run_id)
            VALUES (:name, :checksum, :kind, :duration_ms, :run_id)
            """
        ),
        {
            "name": migration.name,
            "checksum": migration.checksum,
            "kind": migration.kind,
            "duration_ms": duration_ms,
            "run_id": run_id,
        },
    )


def forget(conn: Connection, name: str) -> None:
    conn.execute(text(f"DELETE FROM {LEDGER_TABLE} WHERE name = :name"), {"name": name})


def accept_checksum(conn: Connection, migration: Migration) -> bool:
    """Accept an edited, already-applied file as it is now (the ``repair`` command)."""
    result = conn.execute(
        text(
            f"UPDATE {LEDGER_TABLE} SET checksum = :checksum, repaired_at = now() "
            f"WHERE name = :name AND checksum <> :checksum"
        ),
        {"name": migration.name, "checksum": migration.checksum},
    )
    return result.rowcount > 0


@contextmanager
def runner_lock(engine: Engine, wait_s: float, key: int = RUNNER_LOCK_KEY, poll_s: float = 0.1) -> Iterator[None]:
    """Hold the runner lock for the duration of the block, waiting at most ``wait_s``."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        deadline = time.monotonic() + wait_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            if time.monotonic() >= deadline:
                raise RunnerLockTimeout(
                    f"Another migration runner has held the migration lock for over {wait_s:.0f}s; "
                    "check for a stuck runner (pg_locks, objid of advisory lock) or raise "
                    "MIGRATION_RUNNER_LOCK_WAIT"
                )
            time.sleep(poll_s)
            poll_s = min(poll_s * 1.5, 2.0)
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


@dataclass(frozen=True)
class MigrationStatus:
    name: str
    kind: str
    state: str  # applied | pending | drifted | broken | orphaned
    file_checksum: str | None
    ledger_checksum: str | None
    applied_at: datetime | None


def status(conn: Connection, migrations: list[Migration]) -> list[MigrationStatus]:
    rows = applied(conn)
    out: list[MigrationStatus] = []
    for m in migrations:
        row = rows.get(m.name)
        if m.load_error:
            state = "broken"
        elif row is None:
            state = "pending"
        elif row.checksum != m.checksum:
            state = "drifted"
        else:
            state = "applied"
        out.append(
            MigrationStatus(m.name, m.kind, state, m.checksum, row.checksum if row else None,
                            row.applied_at if row else None)
        )
    known = {m.name for m in migrations}
    for name, row in rows.items():
        if name not in known:
            out.append(MigrationStatus(name, row.kind, "orphaned", None, row.checksum, row.applied_at))
    return out
