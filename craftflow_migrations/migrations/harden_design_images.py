"""
Migration: design_images for a real NAS

- status 'skipped': files over NAS_MAX_FILE_MB, recorded without being read;
- path_bytes: the exact bytes of a path that is not UTF-8 (path holds its \\xNN text form);
- listed_at: when the listing that last wrote the row began (PostgreSQL's clock), so two
  imports of one folder at once cannot undo each other: the newer listing wins.
"""

from sqlalchemy import text

DEPENDS_ON = ["add_design_images"]


def upgrade(connection):
    connection.execute(text("ALTER TYPE design_image_status ADD VALUE IF NOT EXISTS 'skipped'"))
    connection.execute(text(
        "ALTER TABLE design_images ADD COLUMN IF NOT EXISTS path_bytes bytea, "
        "ADD COLUMN IF NOT EXISTS listed_at timestamptz"
    ))


def downgrade(connection):
    connection.execute(text("UPDATE design_images SET status = 'failed' WHERE status = 'skipped'"))
    connection.execute(text("ALTER TABLE design_images DROP COLUMN IF EXISTS path_bytes, DROP COLUMN IF EXISTS listed_at"))
    # An enum value cannot be dropped in place; 'skipped' stays unused.
