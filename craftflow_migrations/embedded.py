"""An embedded PostgreSQL (the pgserver wheel) for the demo and machines with no server."""

from __future__ import annotations

from pathlib import Path

import psycopg2
from sqlalchemy.engine import make_url

DEFAULT_DATA_DIR = Path.home() / ".craftflow_migrations" / "pgdata"


def embedded_database_url(data_dir: Path = DEFAULT_DATA_DIR, database: str = "craftflow") -> str:
    """Start (or reuse) the embedded server and return a URL to ``database`` on it.

    The server keeps running after this process exits so ``dagster dev`` can use the
    same data; ``pg_ctl -D <data_dir> stop`` stops it.
    """
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    admin = server.get_uri()
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if not cur.fetchone():
                cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()
    return make_url(admin).set(database=database).render_as_string(hide_password=False)
