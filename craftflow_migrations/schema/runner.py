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
import re
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..db import error_line
from ..settings import MigrationSettings
from . import ledger
from .discovery import Migration, MigrationPlan, dependents_of
from .plan import _has_rows, _locks, capture
from .rules import check_statements

log = logging.getLogger("craftflow_migrations.runner")

LOCK_NOT_AVAILABLE = "55P03"
# admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now
ADMIN_TERMINATED = ("57P01", "57P02", "57P03")


class MigrationError(RuntimeError):
    """A migration failed; the message names it and says what to do."""


class ChecksumDrift(MigrationError):
    pass


class MigrationLockLost(MigrationError):
    """The runner's session ended mid-work: it stops without applying or recording more."""


@dataclass
class ApplyResult:
    name: str
    state: str  # applied | skipped | failed | blocked
    duration_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    statements: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)  # "table: mode", what the migration's own backend held
    rows: int = 0
    findings: list[str] = field(default_factory=list)  # risk rules (rules.py) over what it executed


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


def _lost_connection(exc: BaseException) -> bool:
    """The session itself is gone (terminated, server restarted, network cut)."""
    if not isinstance(exc, DBAPIError):
        return False
    return bool(exc.connection_invalidated) or getattr(exc.orig, "pgcode", None) in ADMIN_TERMINATED


# CREATE/DROP INDEX CONCURRENTLY and REINDEX CONCURRENTLY wait for every older transaction
# (a pg_dump, a DBA's session) through lock waits; lock_timeout must not cancel that wait,
# which would leave an INVALID index behind. They never block the API's reads and writes.
_WAITS_FOR_SNAPSHOTS = re.compile(r"\b(CREATE\s+(UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX)\b[^;]*\bCONCURRENTLY\b",
                                  re.IGNORECASE | re.DOTALL)


def _set_timeouts(conn: Connection, settings: MigrationSettings, local: bool) -> None:
    scope = "LOCAL " if local else ""
    conn.execute(text(f"SET {scope}lock_timeout = '{int(settings.lock_timeout_s * 1000)}ms'"))
    conn.execute(text(f"SET {scope}statement_timeout = '{int(settings.statement_timeout_s * 1000)}ms'"))


@contextmanager
def _concurrent_builds_wait(conn: Connection, settings: MigrationSettings) -> Iterator[None]:
    """Lift lock_timeout around each concurrent index statement of the block, then restore it."""
    restore = f"SET lock_timeout = '{int(settings.lock_timeout_s * 1000)}ms'"

    def before(_conn, cursor, statement, _params, _context, _many):
        if _WAITS_FOR_SNAPSHOTS.search(statement):
            cursor.execute("SET lock_timeout = 0")

    def after(_conn, cursor, statement, _params, _context, _many):
        if _WAITS_FOR_SNAPSHOTS.search(statement):
            cursor.execute(restore)

    event.listen(conn, "before_cursor_execute", before)
    event.listen(conn, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(conn, "before_cursor_execute", before)
        event.remove(conn, "after_cursor_execute", after)


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


@contextmanager
def _autocommit(conn: Connection, settings: MigrationSettings) -> Iterator[None]:
    """The runner's session in AUTOCOMMIT with its timeouts, for a non-transactional migration."""
    level = conn.default_isolation_level
    conn.execution_options(isolation_level="AUTOCOMMIT")
    try:
        _set_timeouts(conn, settings, local=False)
        with _concurrent_builds_wait(conn, settings):
            yield
        conn.execute(text("RESET lock_timeout"))
        conn.execute(text("RESET statement_timeout"))
    finally:
        # SQLAlchemy keeps a logical transaction even in AUTOCOMMIT; it must end before the level changes.
        if conn.in_transaction():
            conn.rollback() if conn.invalidated else conn.commit()
        if not conn.invalidated:
            conn.execution_options(isolation_level=level)


def _observe(result: ApplyResult, statements: list[str], rows: list[int], locks: list[tuple[str, str]],
             tables_with_rows: set[str], m: Migration) -> None:
    result.statements, result.rows = list(statements), sum(rows)
    result.locks = [f"{table}: {mode}" for table, mode in locks]
    result.findings = [f.line() for f in check_statements(statements, tables_with_rows, m.acknowledged)]


def _upgrade_once(conn: Connection, m: Migration, settings: MigrationSettings, run_id: str | None,
                  keys: list[int], result: ApplyResult) -> None:
    started = time.monotonic()
    if m.transactional:
        with conn.begin():
            _set_timeouts(conn, settings, local=True)
            before = _locks(conn)
            with capture(conn) as (statements, rows):
                m.upgrade(conn)
            taken = sorted(_locks(conn) - before)
            with_rows = {t.split(".", 1)[1] for t, _ in taken if _has_rows(conn, t)}
            _observe(result, statements, rows, taken, with_rows, m)
            ledger.assert_locks_held(conn, keys)
            ledger.record(conn, m, int((time.monotonic() - started) * 1000), run_id)
        return
    # Statements such as CREATE INDEX CONCURRENTLY refuse a transaction block. The file must
    # be idempotent: a crash between its last statement and the ledger row re-runs it.
    with _autocommit(conn, settings), capture(conn) as (statements, rows):
        m.upgrade(conn)
    # Autocommitted statements hold no locks afterwards; what they executed is still checked.
    _observe(result, statements, rows, [], set(), m)
    with conn.begin():
        ledger.assert_locks_held(conn, keys)
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


def _lost_message(name: str, doing: str, exc: BaseException) -> str:
    return (f"Migration runner lost its PostgreSQL session (and with it the migration lock) while {doing} "
            f"{name}: {error_line(exc)}. This runner applied and recorded nothing more; re-run craftflow-migrate "
            "(a runner that took over may already have finished)")


def apply_migration(engine: Engine, m: Migration, settings: MigrationSettings,
                    run_id: str | None = None, logger: logging.Logger | None = None) -> ApplyResult:
    """Apply ``m`` unless it is already recorded. Raises :class:`MigrationError` on failure."""
    logger = logger or log
    if m.load_error:
        raise MigrationError(m.load_error)
    started = time.monotonic()
    ledger.ensure_ledger_table(engine)
    keys = [lock_key_for(m)]
    try:
        with ledger.runner_session(engine, settings.runner_lock_wait_s, keys) as conn:
            # Pending work is decided only now, under the lock.
            row = ledger.applied(conn).get(m.name)
            conn.commit()
            if row is not None:
                if row.checksum != m.checksum:
                    raise ChecksumDrift(drift_message(m.name, row.checksum, m.checksum))
                return ApplyResult(m.name, "skipped")
            logger.info(f"Applying migration {m.name} ({m.kind}"
                        f"{', non-transactional' if not m.transactional else ''})")
            result = ApplyResult(m.name, "applied")
            try:
                result.attempts = _with_lock_retries(lambda: _upgrade_once(conn, m, settings, run_id, keys, result),
                                                     m.name, settings, logger)
            except ledger.RunnerLockLost as exc:
                raise MigrationLockLost(f"{exc} (while applying {m.name})") from None
            except MigrationError:
                raise
            except Exception as exc:
                if _lost_connection(exc):
                    raise MigrationLockLost(_lost_message(m.name, "applying", exc)) from None
                raise MigrationError(f"Migration failed: {m.name}: {error_line(exc)}") from exc
    except ledger.RunnerLockTimeout as exc:
        raise MigrationError(str(exc)) from None
    except DBAPIError as exc:
        if _lost_connection(exc):
            raise MigrationLockLost(_lost_message(m.name, "locking for", exc)) from None
        raise MigrationError(f"Migration failed: {m.name}: {error_line(exc)}") from None
    result.duration_s = time.monotonic() - started
    logger.info(f"Applied migration {m.name} in {result.duration_s:.2f}s")
    for finding in result.findings:
        logger.warning(f"Migration {m.name}: {finding}")
    return result


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
    """Roll back every migration applied after ``target``, in reverse of the ledger's order.

    The order is the one the ledger recorded, not the files' order: a migration applied
    later (a complex one, a file added after others ran) is undone first. The locks of every
    kind being undone are held for the whole downgrade.
    """
    logger = logger or log
    plan.raise_for_errors()
    by_name = plan.by_name()
    if target not in by_name:
        raise MigrationError(f"Cannot downgrade to {target}: no such migration (known: {', '.join(by_name)})")
    ledger.ensure_ledger_table(engine)
    with engine.connect() as conn:
        order = list(ledger.applied(conn))
    if target not in order:
        raise MigrationError(f"Cannot downgrade to {target}: it is not applied")
    keys = {ledger.RUNNER_LOCK_KEY} | {lock_key_for(by_name[n]) for n in order[order.index(target) + 1:]
                                       if n in by_name}
    try:
        with ledger.runner_session(engine, settings.runner_lock_wait_s, sorted(keys)) as conn:
            # Under the locks: what is applied now, in the order it was applied.
            order = list(ledger.applied(conn))
            conn.commit()
            if target not in order:
                raise MigrationError(f"Cannot downgrade to {target}: it is not applied")
            after = order[order.index(target) + 1:]
            unknown = [n for n in after if n not in by_name]
            if unknown:
                raise MigrationError(f"Cannot downgrade to {target}: {', '.join(unknown)} is applied but its file "
                                     "is gone; restore the file first")
            to_undo = [by_name[n] for n in reversed(after)]
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
                        with conn.begin():
                            _set_timeouts(conn, settings, local=True)
                            m.downgrade(conn)
                            ledger.assert_locks_held(conn, sorted(keys))
                            ledger.forget(conn, m.name)
                        return
                    with _autocommit(conn, settings):
                        m.downgrade(conn)
                    with conn.begin():
                        ledger.assert_locks_held(conn, sorted(keys))
                        ledger.forget(conn, m.name)

                try:
                    _with_lock_retries(undo, m.name, settings, logger)
                except ledger.RunnerLockLost as exc:
                    raise MigrationLockLost(f"{exc} (while downgrading {m.name})") from None
                except Exception as exc:
                    if _lost_connection(exc):
                        raise MigrationLockLost(_lost_message(m.name, "downgrading", exc)) from None
                    raise MigrationError(
                        f"Downgrade failed: {m.name}: {error_line(exc)} (rolled back; already undone: "
                        f"{', '.join(done) or 'none'})"
                    ) from exc
                done.append(m.name)
            return done
    except ledger.RunnerLockTimeout as exc:
        raise MigrationError(str(exc)) from None
