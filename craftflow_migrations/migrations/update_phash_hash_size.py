"""
Migration: 256-bit perceptual hashes

pHash with hash_size=16 (256 bits, 64 hex digits) separates near-identical designs far
better than the 64-bit hash. Existing 64-bit hashes stay readable but are marked for
rehash; nothing compares hashes of different sizes.
"""

import logging

from sqlalchemy import text

logger = logging.getLogger(__name__)

DEPENDS_ON = ["add_phash_to_designs"]


def upgrade(connection):
    connection.execute(text("ALTER TABLE designs ALTER COLUMN phash TYPE varchar(64)"))
    connection.execute(text("ALTER TABLE designs ADD COLUMN IF NOT EXISTS phash_hash_size smallint"))
    connection.execute(text(
        "ALTER TABLE designs ADD COLUMN IF NOT EXISTS needs_rehash boolean NOT NULL DEFAULT false"
    ))
    marked = connection.execute(text("""
        UPDATE designs SET phash_hash_size = 8, needs_rehash = true
        WHERE phash IS NOT NULL AND length(phash) = 16 AND phash_hash_size IS NULL
    """)).rowcount
    logger.info(f"{marked} existing 64-bit hashes marked for rehash")


def downgrade(connection):
    # 256-bit hashes do not fit the old column; they are recomputed on the next import.
    connection.execute(text("UPDATE designs SET phash = NULL WHERE length(phash) > 16"))
    connection.execute(text("ALTER TABLE designs ALTER COLUMN phash TYPE varchar(16)"))
    connection.execute(text("ALTER TABLE designs DROP COLUMN IF EXISTS needs_rehash"))
    connection.execute(text("ALTER TABLE designs DROP COLUMN IF EXISTS phash_hash_size"))
