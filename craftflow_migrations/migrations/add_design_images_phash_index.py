"""
Migration: pHash index on design_images, built without blocking imports

CREATE INDEX CONCURRENTLY cannot run in a transaction, hence TRANSACTIONAL = False; the
helper rebuilds an INVALID index left by an earlier failed build.
"""

from sqlalchemy import text

from craftflow_migrations.schema.helpers import create_index_concurrently

DEPENDS_ON = ["add_design_images"]
TRANSACTIONAL = False


def upgrade(connection):
    create_index_concurrently(
        connection, "design_images_phash_idx", "design_images", "phash", where="status = 'ok'"
    )


def downgrade(connection):
    connection.execute(text("DROP INDEX CONCURRENTLY IF EXISTS design_images_phash_idx"))
