"""
Migration: each NAS folder's listing fingerprint at its last complete import

The summary step of an import writes it beside the rows; the worker compares the NAS's
listing with it before anything else, so a re-run of an unchanged NAS needs neither the
Dagster instance nor any of the job's code (Dagster's materializations carry the same
fingerprint, for the UI and the sensors).
"""

from sqlalchemy import text

DEPENDS_ON = ["add_design_images"]


def upgrade(connection):
    connection.execute(text("""
        CREATE TABLE IF NOT EXISTS nas_partition_state (
            partition_key  text PRIMARY KEY,
            fingerprint    text NOT NULL,
            imported_at    timestamptz NOT NULL DEFAULT now()
        )
    """))


def downgrade(connection):
    connection.execute(text("DROP TABLE IF EXISTS nas_partition_state"))
