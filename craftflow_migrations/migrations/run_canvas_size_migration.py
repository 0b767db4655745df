"""
Migration: canvas sizes from legacy labels to numeric inches

Parses labels such as '16x20', '16 x 20"' or '11.7X16.5' into width_in/height_in, with
schema.batched.batched_update: keyset batches, each batch and its checkpoint in one
statement, so a crash loses at most the batch in flight and the next run resumes after the
checkpoint. Labels that do not parse are left NULL and counted.
"""

import logging

from craftflow_migrations.schema.batched import batched_update
from craftflow_migrations.settings import get_settings

logger = logging.getLogger(__name__)

KIND = "complex"
TRANSACTIONAL = False
DEPENDS_ON = ["migration_add_printers_and_canvas_updates"]

NAME = "run_canvas_size_migration"
LABEL_PATTERN = r'^\s*(\d+(?:\.\d+)?)\s*["”]?\s*[xX×]\s*(\d+(?:\.\d+)?)'


def upgrade(connection):
    result = batched_update(
        connection, name=NAME, table="canvas_sizes", todo="t.width_in IS NULL",
        batch_columns=f"regexp_match(t.label, '{LABEL_PATTERN}') AS m",
        set_="width_in = (b.m)[1]::numeric, height_in = (b.m)[2]::numeric, updated_at = now()",
        update_where="b.m IS NOT NULL",
        # Validated with every other setting (a whole number from 1): 0 would convert nothing.
        batch_size=get_settings().migrations.canvas_batch_size,
        logger=logger,
    )
    logger.info(f"Canvas size migration done: {result.rows_seen} rows, "
                f"{result.rows_seen - result.rows_updated} labels could not be parsed")


def downgrade(connection):
    from sqlalchemy import text

    connection.execute(text("UPDATE canvas_sizes SET width_in = NULL, height_in = NULL"))
    connection.execute(text("DELETE FROM craftflow_migration_checkpoints WHERE name = :n"), {"n": NAME})
