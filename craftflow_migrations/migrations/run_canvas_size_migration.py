"""
Migration: canvas sizes from legacy labels to numeric inches

Parses labels such as '16x20', '16 x 20"' or '11.7X16.5' into width_in/height_in.
Keyset-batched: each batch is a single statement that also saves a checkpoint, so a
crash loses at most the batch in flight and the next run resumes after the checkpoint.
Labels that do not parse are left NULL and counted.
"""

import logging
import time

from sqlalchemy import text

from craftflow_migrations.settings import get_settings

logger = logging.getLogger(__name__)

KIND = "complex"
TRANSACTIONAL = False
DEPENDS_ON = ["migration_add_printers_and_canvas_updates"]

NAME = "run_canvas_size_migration"
LABEL_PATTERN = r'^\s*(\d+(?:\.\d+)?)\s*["”]?\s*[xX×]\s*(\d+(?:\.\d+)?)'

BATCH_SQL = text(f"""
    WITH batch AS (
        SELECT id, regexp_match(label, '{LABEL_PATTERN}') AS m
        FROM canvas_sizes
        WHERE id > :after AND width_in IS NULL
        ORDER BY id
        LIMIT :batch_size
    ),
    updated AS (
        UPDATE canvas_sizes c
        SET width_in = (b.m)[1]::numeric, height_in = (b.m)[2]::numeric, updated_at = now()
        FROM batch b
        WHERE c.id = b.id AND b.m IS NOT NULL
        RETURNING c.id
    ),
    saved AS (
        INSERT INTO craftflow_migration_checkpoints (name, last_id, rows_done, updated_at)
        SELECT :name, max(id), :done_before + count(*), now() FROM batch HAVING count(*) > 0
        ON CONFLICT (name) DO UPDATE
            SET last_id = EXCLUDED.last_id, rows_done = EXCLUDED.rows_done, updated_at = now()
        RETURNING last_id
    )
    SELECT (SELECT count(*) FROM batch) AS seen,
           (SELECT count(*) FROM updated) AS updated,
           (SELECT max(last_id) FROM saved) AS last_id
""")


def upgrade(connection):
    # Validated (a whole number from 1) with every other setting: 0 would convert nothing.
    batch_size = get_settings().migrations.canvas_batch_size
    connection.execute(text("""
        CREATE TABLE IF NOT EXISTS craftflow_migration_checkpoints (
            name        text PRIMARY KEY,
            last_id     bigint NOT NULL,
            rows_done   bigint NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
    """))
    checkpoint = connection.execute(
        text("SELECT last_id, rows_done FROM craftflow_migration_checkpoints WHERE name = :n"), {"n": NAME}
    ).first()
    after, done = (checkpoint.last_id, checkpoint.rows_done) if checkpoint else (0, 0)
    remaining = connection.execute(
        text("SELECT count(*) FROM canvas_sizes WHERE id > :after AND width_in IS NULL"), {"after": after}
    ).scalar()
    if checkpoint:
        logger.info(f"Resuming canvas size migration after id {after} ({done} rows done, {remaining} to go)")
    else:
        logger.info(f"Canvas size migration: {remaining} rows to convert in batches of {batch_size}")

    started = time.monotonic()
    seen_total = unparsed = 0
    while True:
        row = connection.execute(
            BATCH_SQL, {"after": after, "batch_size": batch_size, "name": NAME, "done_before": done}
        ).one()
        if row.seen == 0:
            break
        after, done = row.last_id, done + row.seen
        seen_total += row.seen
        unparsed += row.seen - row.updated
        elapsed = time.monotonic() - started
        rate = seen_total / elapsed if elapsed > 0 else 0.0
        eta = (remaining - seen_total) / rate if rate > 0 else 0.0
        logger.info(
            f"canvas sizes: {seen_total}/{remaining} rows ({100 * seen_total / max(remaining, 1):.0f}%), "
            f"{rate:,.0f} rows/s, ETA {max(eta, 0):.0f}s"
        )
    connection.execute(text("DELETE FROM craftflow_migration_checkpoints WHERE name = :n"), {"n": NAME})
    logger.info(f"Canvas size migration done: {seen_total} rows, {unparsed} labels could not be parsed")


def downgrade(connection):
    connection.execute(text("UPDATE canvas_sizes SET width_in = NULL, height_in = NULL"))
    connection.execute(text("DELETE FROM craftflow_migration_checkpoints WHERE name = :n"), {"n": NAME})
