"""
Migration: a thumbnail row may point into a pack file instead of holding the bytes

With ``CRAFTFLOW_THUMBNAIL_STORE=folder`` (the default) the import appends thumbnails to pack
files in ``CRAFTFLOW_THUMBNAIL_DIR`` and this table keeps, per sha256, the pack, the offset
and the length; rows written before keep their bytes in ``jpeg``, and both are read alike.
Exactly one of the two is set. Dropping NOT NULL and adding nullable columns are catalog
updates; the CHECK is added NOT VALID: enforced for every new row at once, and left
unvalidated because every row already there has its bytes (NOT NULL until now) and no pack,
so a validating scan under the ACCESS EXCLUSIVE lock would only read the table to agree.

Downgrade deletes the rows that point into packs (the old schema cannot hold them; the
packs stay on disk) before restoring NOT NULL: those images show no thumbnail until
re-imported with ``import --force``.
"""

from sqlalchemy import text

DEPENDS_ON = ["store_design_thumbnails_uncompressed"]


def upgrade(connection):
    connection.execute(text("""
        ALTER TABLE design_thumbnails
            ALTER COLUMN jpeg DROP NOT NULL,
            ADD COLUMN IF NOT EXISTS pack text,
            ADD COLUMN IF NOT EXISTS pack_offset bigint,
            ADD COLUMN IF NOT EXISTS pack_length integer
    """))
    connection.execute(text("""
        DO $$ BEGIN
            ALTER TABLE design_thumbnails ADD CONSTRAINT design_thumbnails_bytes_or_pack
                CHECK ((jpeg IS NULL) <> (pack IS NULL)
                       AND (pack IS NULL OR (pack_offset IS NOT NULL AND pack_length IS NOT NULL))) NOT VALID;
        EXCEPTION WHEN duplicate_object THEN NULL;
        END $$
    """))


def downgrade(connection):
    connection.execute(text("DELETE FROM design_thumbnails WHERE jpeg IS NULL"))
    connection.execute(text("""
        ALTER TABLE design_thumbnails
            DROP CONSTRAINT IF EXISTS design_thumbnails_bytes_or_pack,
            DROP COLUMN IF EXISTS pack,
            DROP COLUMN IF EXISTS pack_offset,
            DROP COLUMN IF EXISTS pack_length,
            ALTER COLUMN jpeg SET NOT NULL
    """))
