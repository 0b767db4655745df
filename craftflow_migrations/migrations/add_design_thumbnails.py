"""
Migration: thumbnails made at import, content-addressed by the file's sha256

The import makes each thumbnail from the image it has already decoded; the duplicates
report and later assets read them here and never the NAS. Keyed by sha256, a replaced file
can never show a stale picture, and byte-identical copies share one thumbnail.
"""

from sqlalchemy import text

DEPENDS_ON = ["add_design_images"]


def upgrade(connection):
    connection.execute(text("""
        CREATE TABLE IF NOT EXISTS design_thumbnails (
            sha256      char(64) PRIMARY KEY,
            jpeg        bytea NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
    """))


def downgrade(connection):
    connection.execute(text("DROP TABLE IF EXISTS design_thumbnails"))
