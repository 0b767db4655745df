"""
Migration: thumbnails stored out of line without a compression attempt

A thumbnail is a JPEG, or a small PNG/GIF/WebP that is its own thumbnail: already compressed.
With the default storage (EXTENDED) PostgreSQL first tries pglz on every one, fails, and only
then moves it to TOAST. EXTERNAL skips the attempt: 30,000 binary COPY rows of 9 KB took
39-51 us of the server's CPU each against 57-64 us (``benchmarks/README.md``). Only rows
written from now on are affected; nothing is rewritten. The ALTER holds an ACCESS EXCLUSIVE
lock on design_thumbnails for a catalog update only, a table only the import writes.
"""

from sqlalchemy import text

DEPENDS_ON = ["add_design_thumbnails"]


def upgrade(connection):
    connection.execute(text("ALTER TABLE design_thumbnails ALTER COLUMN jpeg SET STORAGE EXTERNAL"))


def downgrade(connection):
    connection.execute(text("ALTER TABLE design_thumbnails ALTER COLUMN jpeg SET STORAGE EXTENDED"))
