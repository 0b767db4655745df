"""Adopt a database the old service migrated: its tables exist, but there is no ledger.

What each migration creates is learnt, not declared: every migration up to the target runs
in a scratch schema, inside a transaction that is rolled back, and SQLAlchemy's inspector
compares the scratch schema before and after it (tables, columns, indexes, unique
constraints created or dropped). The same objects are then looked for in the real schema.
A migration whose objects are all there is recorded as applied with its checksum; one that
does not match is reported, with what is missing, and not recorded. Concurrent index
builds run without CONCURRENTLY in the scratch schema (nothing can use it anyway).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine

from ..db import error_line
from ..settings import MigrationSettings
from . import ledger
from .discovery import Migration, MigrationPlan

Snapshot = dict[str, dict[str, set[str]]]  # table -> {"columns": ..., "indexes": ..., "uniques": ...}


@dataclass
class BaselineResult:
    name: str
    state: str  # recorded | already-recorded | mismatch | failed
    checked: int = 0
    missing: list[str] = field(default_factory=list)


def _snapshot(conn: Connection, schema: str) -> Snapshot:
    inspector = inspect(conn)
    out: Snapshot = {}
    for table in inspector.get_table_names(schema=schema):
        out[table] = {
            "columns": {c["name"] for c in inspector.get_columns(table, schema=schema)},
            "indexes": {i["name"] for i in inspector.get_indexes(table, schema=schema)},
            "uniques": {u["name"] for u in inspector.get_unique_constraints(table, schema=schema) if u["name"]},
        }
    return out


def _diff(before: Snapshot, after: Snapshot) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(created, dropped) objects as (kind, table, name)."""
    created, dropped = [], []
    for table, parts in after.items():
        if table not in before:
            created.append(("table", table, table))
        for kind, names in parts.items():
            for name in names - before.get(table, {}).get(kind, set()):
                created.append((kind, table, name))
    for table, parts in before.items():
        for kind in ("indexes", "uniques"):
            for name in parts[kind] - after.get(table, {}).get(kind, set()):
                dropped.append((kind, table, name))
    return created, dropped


def _present(snapshot: Snapshot, kind: str, table: str, name: str) -> bool:
    return table in snapshot and (kind == "table" or name in snapshot[table][kind])


def _missing(real: Snapshot, final: Snapshot, created: list[tuple[str, str, str]],
             dropped: list[tuple[str, str, str]]) -> list[str]:
    """What of a migration's effects the real schema lacks; effects a later migration undid
    (the credentials columns moved out of shops) are not required."""
    created = [c for c in created if _present(final, *c)]
    dropped = [d for d in dropped if not _present(final, *d)]
    out = []
    for kind, table, name in created:
        if kind == "table":
            if table not in real:
                out.append(f"table {table}")
        elif table in real and name not in real[table][kind]:
            out.append(f"{kind[:-1] if kind != 'indexes' else 'index'} {table}.{name}")
    for kind, table, name in dropped:
        if table in real and name in real[table][kind]:
            out.append(f"{kind[:-1] if kind != 'indexes' else 'index'} {table}.{name} should be gone")
    return out


def learn_effects(engine: Engine, migrations: list[Migration]) -> tuple[dict[str, tuple[list, list] | str], Snapshot]:
    """What each migration creates and drops, and the schema they leave together, learnt in a
    rolled-back scratch schema."""
    scratch = f"cfm_baseline_{uuid.uuid4().hex[:8]}"
    effects: dict[str, tuple[list, list] | str] = {}

    def no_concurrently(_conn, _cursor, statement, params, _context, _many):
        return re.sub(r"\bCONCURRENTLY\b", "", statement, flags=re.I), params

    with engine.connect() as conn:
        tx = conn.begin()
        try:
            conn.execute(text(f'CREATE SCHEMA "{scratch}"'))
            conn.execute(text(f'SET LOCAL search_path = "{scratch}"'))
            event.listen(conn, "before_cursor_execute", no_concurrently, retval=True)
            for m in migrations:
                before = _snapshot(conn, scratch)
                savepoint = conn.begin_nested()
                try:
                    m.upgrade(conn)
                    savepoint.commit()
                except Exception as exc:  # noqa: BLE001 - reported per migration
                    savepoint.rollback()
                    effects[m.name] = f"could not be replayed in a scratch schema: {error_line(exc)}"
                    continue
                effects[m.name] = _diff(before, _snapshot(conn, scratch))
            final = _snapshot(conn, scratch)
        finally:
            event.remove(conn, "before_cursor_execute", no_concurrently)
            tx.rollback()
    return effects, final


def baseline(engine: Engine, plan: MigrationPlan, settings: MigrationSettings, to: str | None = None,
             run_id: str | None = None) -> list[BaselineResult]:
    """Record every startup migration (up to ``to``) whose objects exist, with its checksum."""
    plan.raise_for_errors()
    migrations = plan.of_kind("startup")
    names = [m.name for m in migrations]
    if to is not None:
        if to not in names:
            raise ValueError(f"Cannot baseline to {to}: no such startup migration (known: {', '.join(names)})")
        migrations = migrations[: names.index(to) + 1]
    effects, final = learn_effects(engine, migrations)
    ledger.ensure_ledger_table(engine)
    results = []
    with ledger.runner_session(engine, settings.runner_lock_wait_s) as conn:
        done = ledger.applied(conn)
        real = _snapshot(conn, conn.execute(text("SELECT current_schema()")).scalar())
        conn.commit()
        for m in migrations:
            if m.name in done:
                results.append(BaselineResult(m.name, "already-recorded"))
                continue
            effect = effects[m.name]
            if isinstance(effect, str):
                results.append(BaselineResult(m.name, "failed", missing=[effect]))
                continue
            created, dropped = effect
            missing = _missing(real, final, created, dropped)
            if missing:
                results.append(BaselineResult(m.name, "mismatch", len(created) + len(dropped), missing))
                continue
            with conn.begin():
                ledger.assert_locks_held(conn, [ledger.RUNNER_LOCK_KEY])
                ledger.record(conn, m, 0, run_id)
            results.append(BaselineResult(m.name, "recorded", len(created) + len(dropped)))
    return results
