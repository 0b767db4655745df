"""Apply or roll back one migration, safely.

- Pending work is computed only after the runner lock is held.
- A transactional migration and its ledger row commit together, so a crash can never
  leave a migration applied but unrecorded (or the reverse).
- ``lock_timeout`` is short and retried with backoff, so a migration waiting on a busy
  table gives way to the live API instead of queueing every query behind it.
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..settings import MigrationSettings
from . import ledger
from .discovery import Migration, MigrationPlan, dependents_of

log = logging.getLogger("craftflow_migrations.runner")

LOCK_NOT_AVAILABLE = "55P03"


class MigrationError(RuntimeError):
    """A migration failed; the message names it and says what to do."""


class ChecksumDrift(MigrationError):
    pass


@dataclass
class ApplyResult:
    name: str
    state: str  # applied | skipped | failed | blocked
    duration_s: float = 0.0
    attempts: int = 0
    error: str | None = None


@dataclass
class RunReport:
    results: list[ApplyResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ApplyResult]:
        return [r for r in self.results if r.state in ("failed", "blocked")]

    def count(self, state: str) -> int:
        return sum(1 for r in self.results if r.state == state)


def lock_key_for(migration: Migration) -> int:
    # Complex migrations may run for hours; they lock only themselves so a deploy's
    # startup migrations are not held up behind them.
    if migration.kind == "startup":
        return ledger.RUNNER_LOCK_KEY
    return ledger.RUNNER_LOCK_KEY + 1 + zlib.crc32(migration.name.encode())


def _is_lock_timeout(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return str(exc.orig).strip().splitlines()[0]
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def _set_timeouts(conn: Connection, settings: MigrationSettings, local: bool) -> None:
    scope = "LOCAL " if local else ""
    conn.execute(text(f"SET {scope}lock_timeout = '{int(settings.lock_timeout_s * 1000)}ms'"))
    conn.execute(text(f"SET {scope}statement_timeout = '{int(settings.statement_timeout_s * 1000)}ms'"))


def drift_message(name: str, ledger_checksum: str, file_checksum: str) -> str:
    return (
        f"Migration {name} was changed after it was applied (ledger checksum {ledger_checksum[:12]}, "
        f"file {file_checksum[:12]}): revert the file, or accept the change with "
        f"`craftflow-migrate repair {name}`"
    )


def check_drift(engine: Engine, migrations: list[Migration]) -> None:
    with engine.connect() as conn:
        rows = ledger.applied(conn)
    drifted = [
        drift_message(m.name, rows[m.name].checksum, m.checksum)
        for m in migrations
        if m.name in rows and rows[m.name].checksum != m.checksum
    ]
    if drifted:
        raise ChecksumDrift("; ".join(drifted))


def pending(engine: Engine, migrations: list[Migration]) -> list[str]:
    """Names of ``migrations`` not yet recorded in the ledger, in run order."""
    with engine.connect() as conn:
        done = ledger.applied(conn)
    return [m.name for m in migrations if m.name not in done]


def _upgrade_once(engine: Engine, m: Migration, settings: MigrationSettings, run_id: str | None) -> None:
    started = time.monotonic()
    if m.transactional:
        with engine.connect() as conn, conn.begin():
            _set_timeouts(conn, settings, local=True)
            m.upgrade(conn)
            ledger.record(conn, m, int((time.monotonic() - started) * 1000), run_id)
        return
    # Statements such as CREATE INDEX CONCURRENTLY refuse a transaction block. The file must
    # be idempotent: a crash between its last statement and the ledger row re-runs it.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        _set_timeouts(conn, settings, local=False)
        try:
            m.upgrade(conn)
        finally:
            conn.execute(text("RESET lock_timeout"))
            conn.execute(text("RESET statement_timeout"))
    with engine.begin() as conn:
        ledger.record(conn, m, int((time.monotonic() - started) * 1000), run_id)


def _with_lock_retries(action: Callable[[], None], name: str, settings: MigrationSettings,
                       logger: logging.Logger | None) -> int:
    logger = logger or log
    attempt = 0
    while True:
        attempt += 1
        try:
            action()
            return attempt
        except Exception as exc:
            if not _is_lock_timeout(exc) or attempt > settings.lock_retries:
                raise
            delay = min(30.0, 2 ** (attempt - 1)) * (0.5 + random.random())
            logger.warning(
                f"Migration {name} waited over {settings.lock_timeout_s:g}s for a table lock "
                f"(attempt {attempt}); retrying in {delay:.1f}s"
            )
            time.sleep(delay)


def apply_migration(engine: Engine, m: Migration, settings: MigrationSettings,
                    run_id: str | None = None, logger: logging.Logger | None = None) -> ApplyResult:
    """Apply ``m`` unless it is already recorded. Raises :class:`MigrationError` on failure."""
    logger = logger or log
    if m.load_error:
        raise MigrationError(m.load_error)
    started = time.monotonic()
    ledger.ensure_ledger_table(engine)
    with ledger.runner_lock(engine, settings.runner_lock_wait_s, key=lock_key_for(m)):
        with engine.begin() as conn:
            row = ledger.applied(conn).get(m.name)
        if row is not None:
            if row.checksum != m.checksum:
                raise ChecksumDrift(drift_message(m.name, row.checksum, m.checksum))
            return ApplyResult(m.name, "skipped")
        logger.info(f"Applying migration {m.name} ({m.kind}{', non-transactional' if not m.transactional else ''})")
        try:
            attempts = _with_lock_retries(lambda: _upgrade_once(engine, m, settings, run_id), m.name, settings, logger)
        except Exception as exc:
            raise MigrationError(f"Migration failed: {m.name}: {_error_line(exc)}") from exc
    duration = time.monotonic() - started
    logger.info(f"Applied migration {m.name} in {duration:.2f}s")
    return ApplyResult(m.name, "applied", duration, attempts)


def run_pending(engine: Engine, plan: MigrationPlan, kind: str, settings: MigrationSettings,
                run_id: str | None = None, logger: logging.Logger | None = None) -> RunReport:
    """Plain-Python runner (no Dagster): same semantics as the startup job's op graph."""
    logger = logger or log
    plan.raise_for_errors()
    migrations = plan.of_kind(kind)
    ledger.ensure_ledger_table(engine)
    check_drift(engine, migrations)
    report = RunReport()
    blocked: set[str] = set()
    for m in migrations:
        if m.name in blocked:
            report.results.append(ApplyResult(m.name, "blocked", error="a dependency failed"))
            continue
        try:
            report.results.append(apply_migration(engine, m, settings, run_id, logger))
        except MigrationError as exc:
            logger.error(str(exc))
            report.results.append(ApplyResult(m.name, "failed", error=str(exc)))
            blocked |= dependents_of(plan, m.name)
    return report


def downgrade_to(engine: Engine, plan: MigrationPlan, target: str, settings: MigrationSettings,
                 logger: logging.Logger | None = None) -> list[str]:
    """Roll back every applied migration after ``target``, newest first. Returns their names."""
    logger = logger or log
    plan.raise_for_errors()
    names = [m.name for m in plan.migrations]
    if target not in names:
        raise MigrationError(f"Cannot downgrade to {target}: no such migration (known: {', '.join(names)})")
    with ledger.runner_lock(engine, settings.runner_lock_wait_s):
        with engine.connect() as conn:
            rows = ledger.applied(conn)
        if target not in rows:
            raise MigrationError(f"Cannot downgrade to {target}: it is not applied")
        after = plan.migrations[names.index(target) + 1:]
        to_undo = [m for m in reversed(after) if m.name in rows]
        missing = [m.name for m in to_undo if not m.has_downgrade]
        if missing:
            raise MigrationError(
                f"Cannot downgrade to {target}: {', '.join(missing)} has no downgrade(connection); "
                "write one or restore from a backup"
            )
        done: list[str] = []
        for m in to_undo:
            logger.info(f"Downgrading migration {m.name}")

            def undo(m: Migration = m) -> None:
                if m.transactional:
                    with engine.connect() as conn, conn.begin():
                        _set_timeouts(conn, settings, local=True)
                        m.downgrade(conn)
                        ledger.forget(conn, m.name)
                else:
                    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                        _set_timeouts(conn, settings, local=False)
                        m.downgrade(conn)
                    with engine.begin() as conn:
                        ledger.forget(conn, m.name)

            try:
                _with_lock_retries(undo, m.name, settings, logger)
            except Exception as exc:
                raise MigrationError(
                    f"Downgrade failed: {m.name}: {_error_line(exc)} (rolled back; already undone: "
                    f"{', '.join(done) or 'none'})"
                ) from exc
            done.append(m.name)
        return done
