"""
Migration: shops whose images changed since duplicates were last grouped

The import marks a shop here when it writes any of its rows (or links them to a shop); the
duplicates step regroups only the scopes those shops touch and clears the marks in the
same transaction. An unchanged NAS leaves nothing to regroup.
"""

from sqlalchemy import text

DEPENDS_ON = ["add_design_duplicates"]


def upgrade(connection):
    connection.execute(text("""
        CREATE TABLE IF NOT EXISTS design_duplicate_dirty_shops (
            shop       text PRIMARY KEY,
            marked_at  timestamptz NOT NULL DEFAULT now()
        )
    """))
    # Everything imported before this migration is regrouped once.
    connection.execute(text(
        "INSERT INTO design_duplicate_dirty_shops (shop) SELECT DISTINCT shop FROM design_images "
        "ON CONFLICT DO NOTHING"
    ))


def downgrade(connection):
    connection.execute(text("DROP TABLE IF EXISTS design_duplicate_dirty_shops"))
