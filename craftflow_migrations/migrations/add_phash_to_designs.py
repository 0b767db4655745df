"""
Migration: perceptual hash on designs

A 64-bit pHash (16 hex digits) per design, indexed for duplicate look-ups.
"""

from sqlalchemy import text

DEPENDS_ON = ["migration_add_railway_entities"]


def upgrade(connection):
    connection.execute(text("ALTER TABLE designs ADD COLUMN IF NOT EXISTS phash varchar(16)"))
    connection.execute(text("CREATE INDEX IF NOT EXISTS designs_phash_idx ON designs (phash)"))


def downgrade(connection):
    connection.execute(text("DROP INDEX IF EXISTS designs_phash_idx"))
    connection.execute(text("ALTER TABLE designs DROP COLUMN IF EXISTS phash"))
