"""Know what a deploy will do before it does it: a dry run of every pending migration.

All pending transactional migrations run in one transaction that is rolled back at the end,
each inside its own savepoint so a later migration sees what an earlier one created. For
each we capture the SQL it executed, the locks its backend took (``pg_locks``: table and
mode, and whether the table has rows), the rows its statements touched and its time, then
apply the risk rules (``rules.py``) to the captured SQL. Non-transactional migrations
(``CREATE INDEX CONCURRENTLY``) cannot run inside a transaction: they are listed as not
dry-runnable, and so is anything that depends on one.

Nothing is committed: ``lock_timeout`` is short, so a dry run against a busy production
database gives way instead of queueing the API behind it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine

from ..db import error_line
from ..settings import MigrationSettings
from . import ledger
from .discovery import Migration, MigrationPlan
from .rules import Finding, check_statements


@dataclass(frozen=True)
class LockTaken:
    table: str
    mode: str
    has_rows: bool

    @property
    def stands_out(self) -> bool:
        return self.mode == "AccessExclusiveLock" and self.has_rows


@dataclass
class MigrationPlanReport:
    name: str
    state: str  # dry-run | not-dry-runnable | failed | blocked
    statements: list[str] = field(default_factory=list)
    locks: list[LockTaken] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    error: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def unacknowledged(self) -> list[Finding]:
        return [f for f in self.findings if not f.acknowledged]


@contextmanager
def capture(conn: Connection) -> Iterator[tuple[list[str], list[int]]]:
    """Statements executed on ``conn`` (and the rows each touched) for the block."""
    statements: list[str] = []
    rows: list[int] = []

    def after(_conn, cursor, statement, _params, _context, _many):
        statements.append(" ".join(statement.split()))
        rows.append(max(cursor.rowcount, 0) if cursor.description is None else 0)

    event.listen(conn, "after_cursor_execute", after)
    try:
        yield statements, rows
    finally:
        event.remove(conn, "after_cursor_execute", after)


_LOCKS = text(
    """
    SELECT n.nspname || '.' || c.relname AS tbl, c.relname, l.mode, c.relkind
    FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'p', 'm')
    """
)


def _locks(conn: Connection) -> set[tuple[str, str]]:
    return {(r.tbl, r.mode) for r in conn.execute(_LOCKS)}


def _has_rows(conn: Connection, table: str) -> bool:
    try:
        with conn.begin_nested():
            return bool(conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {table})")).scalar())
    except Exception:  # noqa: BLE001 - a table created by the migration itself
        return False


def dry_run(engine: Engine, plan: MigrationPlan, kind: str, settings: MigrationSettings) -> list[MigrationPlanReport]:
    """Dry-run every pending migration of ``kind``, in order; nothing is committed."""
    plan.raise_for_errors()
    migrations = plan.of_kind(kind)
    with engine.connect() as conn:
        done = ledger.applied(conn)
    pending = [m for m in migrations if m.name not in done]
    reports: list[MigrationPlanReport] = []
    skipped: set[str] = set()
    conn = engine.connect()
    outer = conn.begin()
    try:
        conn.execute(text(f"SET LOCAL lock_timeout = '{int(settings.lock_timeout_s * 1000)}ms'"))
        conn.execute(text(f"SET LOCAL statement_timeout = '{int(settings.statement_timeout_s * 1000)}ms'"))
        for m in pending:
            if m.load_error:
                reports.append(MigrationPlanReport(m.name, "failed", error=m.load_error))
                skipped.add(m.name)
                continue
            blocked_by = [d for d in m.depends_on if d in skipped]
            if not m.transactional:
                reports.append(MigrationPlanReport(m.name, "not-dry-runnable", error=(
                    "TRANSACTIONAL = False (e.g. CREATE INDEX CONCURRENTLY): statements that refuse a "
                    "transaction cannot be rolled back, so it is not run here")))
                skipped.add(m.name)
                continue
            if blocked_by:
                reports.append(MigrationPlanReport(m.name, "blocked", error=f"depends on {', '.join(blocked_by)}, "
                                                   "which could not be dry-run"))
                skipped.add(m.name)
                continue
            reports.append(_dry_run_one(conn, m))
            if reports[-1].state != "dry-run":
                skipped.add(m.name)
    finally:
        outer.rollback()
        conn.close()
    return reports


def _dry_run_one(conn: Connection, m: Migration) -> MigrationPlanReport:
    report = MigrationPlanReport(m.name, "dry-run")
    before = _locks(conn)
    started = time.monotonic()
    savepoint = conn.begin_nested()
    try:
        with capture(conn) as (statements, rows):
            m.upgrade(conn)
        report.statements, report.rows = statements, sum(rows)
        report.seconds = time.monotonic() - started
        taken = sorted(_locks(conn) - before)
        report.locks = [LockTaken(table, mode, _has_rows(conn, table)) for table, mode in taken]
        savepoint.commit()  # stays inside the outer transaction, which is rolled back
    except Exception as exc:  # noqa: BLE001 - a failing migration is a finding of the plan
        savepoint.rollback()
        report.state, report.error = "failed", error_line(exc)
        report.seconds = time.monotonic() - started
        return report
    tables_with_rows = {lock.table.split(".", 1)[1] for lock in report.locks if lock.has_rows}
    report.findings = check_statements(report.statements, tables_with_rows, m.acknowledged)
    return report
