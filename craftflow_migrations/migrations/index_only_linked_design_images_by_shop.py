"""
Migration: index only the design_images rows linked to a shop

A NAS folder is linked to the shops row of its name when exactly one shop has it; the rows of
every other folder (shops not on the platform, names two tenants share) have no ``shop_id``,
and each was an entry of ``design_images_shop_id_idx`` that no lookup by shop ever reads:
about 1.5 us of PostgreSQL's CPU per imported row and 20-30 MB per million such rows. The
partial index serves every ``shop_id = ...`` lookup and the ``ON DELETE SET NULL`` from
``shops`` alike (an equality implies NOT NULL). Built concurrently, then the old index dropped
concurrently: imports and the API go on writing meanwhile.
"""

from sqlalchemy import text

from craftflow_migrations.schema.helpers import create_index_concurrently

DEPENDS_ON = ["add_design_images"]
TRANSACTIONAL = False


def upgrade(connection):
    create_index_concurrently(connection, "design_images_linked_shop_id_idx", "design_images", "shop_id",
                              where="shop_id IS NOT NULL")
    connection.execute(text("DROP INDEX CONCURRENTLY IF EXISTS design_images_shop_id_idx"))


def downgrade(connection):
    create_index_concurrently(connection, "design_images_shop_id_idx", "design_images", "shop_id")
    connection.execute(text("DROP INDEX CONCURRENTLY IF EXISTS design_images_linked_shop_id_idx"))
