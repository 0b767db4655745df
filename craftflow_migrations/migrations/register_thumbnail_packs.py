"""
Migration: the thumbnail packs each database wrote, by name and by database

The thumbnail prune deletes a pack that no ``design_thumbnails`` row points at. In a folder
that two databases share (staging and production given one ``CRAFTFLOW_THUMBNAIL_DIR``, a
restored copy of the database beside the original), every pack of the other database is such
a pack. Each pack is now registered here, with the identity of the database that writes it,
before its first byte is written, and the prune only deletes or rewrites packs registered by
its own database (a restored copy's rows say the original's identity, so it leaves them too).

The packs that rows point at today are registered as this database's: they were written
through it. A pack no row points at is left unregistered, and so is never deleted by the
prune (it is counted and named as not this database's).

Downgrade drops the table; the packs stay on disk.
"""

from sqlalchemy import text

from craftflow_migrations.nas.store import DATABASE_IDENTITY

DEPENDS_ON = ["store_design_thumbnails_in_packs"]


def upgrade(connection):
    connection.execute(text("""
        CREATE TABLE IF NOT EXISTS thumbnail_packs (
            name text PRIMARY KEY,
            written_by text NOT NULL,
            registered_at timestamptz NOT NULL DEFAULT now()
        )
    """))
    connection.execute(text(f"""
        INSERT INTO thumbnail_packs (name, written_by)
        SELECT DISTINCT pack, {DATABASE_IDENTITY} FROM design_thumbnails WHERE pack IS NOT NULL
        ON CONFLICT (name) DO NOTHING
    """))


def downgrade(connection):
    connection.execute(text("DROP TABLE IF EXISTS thumbnail_packs"))
