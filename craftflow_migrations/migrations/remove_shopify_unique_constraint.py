"""
Migration: allow one Shopify store in several tenants

Agencies connect the same Shopify store to more than one tenant, so the store domain is
no longer unique; it stays indexed for look-ups.
"""

from sqlalchemy import text

DEPENDS_ON = ["separate_platform_connections"]


def upgrade(connection):
    connection.execute(text(
        "ALTER TABLE platform_connections DROP CONSTRAINT IF EXISTS platform_connections_shopify_domain_key"
    ))
    connection.execute(text(
        "CREATE INDEX IF NOT EXISTS platform_connections_shopify_domain_idx "
        "ON platform_connections (shopify_domain) WHERE shopify_domain IS NOT NULL"
    ))


def downgrade(connection):
    connection.execute(text("DROP INDEX IF EXISTS platform_connections_shopify_domain_idx"))
    # Fails, and rolls back, if two connections now share a domain: resolve those first.
    connection.execute(text(
        "ALTER TABLE platform_connections ADD CONSTRAINT platform_connections_shopify_domain_key "
        "UNIQUE (shopify_domain)"
    ))
