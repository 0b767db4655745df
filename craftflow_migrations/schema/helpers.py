"""Small, safe building blocks for migration files.

Migration files may use plain ``connection.execute(text(...))`` (the historical format);
these helpers cover the cases where the obvious SQL has a trap.
"""

from __future__ import annotations

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection


def table_exists(conn: Connection, table: str) -> bool:
    return inspect(conn).has_table(table)


def column_exists(conn: Connection, table: str, column: str) -> bool:
    if not table_exists(conn, table):
        return False
    return any(c["name"] == column for c in inspect(conn).get_columns(table))


def index_state(conn: Connection, name: str) -> str | None:
    """``'valid'``, ``'invalid'`` or ``None`` when there is no such index."""
    valid = conn.execute(
        text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :n AND pg_catalog.pg_table_is_visible(c.oid)"
        ),
        {"n": name},
    ).scalar()
    if valid is None:
        return None
    return "valid" if valid else "invalid"


def create_index_concurrently(conn: Connection, name: str, table: str, definition: str,
                              unique: bool = False, where: str | None = None) -> str:
    """Build an index without blocking writes; needs ``TRANSACTIONAL = False``.

    A failed concurrent build leaves an INVALID index behind, which ``IF NOT EXISTS``
    would silently accept; such an index is dropped and built again.
    Returns ``'exists'``, ``'created'`` or ``'rebuilt'``.
    """
    state = index_state(conn, name)
    if state == "valid":
        return "exists"
    if state == "invalid":
        conn.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
    clause = f" WHERE {where}" if where else ""
    conn.execute(
        text(f'CREATE {"UNIQUE " if unique else ""}INDEX CONCURRENTLY "{name}" ON {table} ({definition}){clause}')
    )
    return "rebuilt" if state == "invalid" else "created"


def add_enum_value(conn: Connection, enum: str, value: str) -> None:
    """Add a value to an enum type.

    PostgreSQL refuses to *use* a value added by ``ALTER TYPE ... ADD VALUE`` before the
    adding transaction commits, so put statements that use it in a later migration
    (``DEPENDS_ON`` this one); the runner commits each migration separately.
    """
    conn.execute(text(f"ALTER TYPE {enum} ADD VALUE IF NOT EXISTS '{value}'"))
