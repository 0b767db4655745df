"""
Migration: Etsy shop id on shops

Etsy identifies a shop by a numeric id; at most one CraftFlow shop per Etsy shop.
"""

from sqlalchemy import text

DEPENDS_ON = ["add_multi_tenant_schema"]


def upgrade(connection):
    connection.execute(text("ALTER TABLE shops ADD COLUMN IF NOT EXISTS etsy_shop_id bigint"))
    connection.execute(text(
        "CREATE UNIQUE INDEX IF NOT EXISTS shops_etsy_shop_id_key ON shops (etsy_shop_id) "
        "WHERE etsy_shop_id IS NOT NULL"
    ))


def downgrade(connection):
    connection.execute(text("DROP INDEX IF EXISTS shops_etsy_shop_id_key"))
    connection.execute(text("ALTER TABLE shops DROP COLUMN IF EXISTS etsy_shop_id"))
