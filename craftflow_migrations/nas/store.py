"""design_images rows: what is known of a partition, bulk upserts, removals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    bindparam,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ENUM, insert
from sqlalchemy.engine import Connection

from .client import NasFile
from .hashing import PHASH_ALGORITHM, ImageFacts

metadata = MetaData()
design_images = Table(
    "design_images",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("shop", Text),
    Column("template", Text),
    Column("path", Text),
    Column("shop_id", BigInteger),
    Column("size_bytes", BigInteger),
    Column("mtime", DateTime(timezone=True)),
    Column("sha256", Text),
    Column("phash", Text),
    Column("hash_algorithm", Text),
    Column("hash_size", SmallInteger),
    Column("width", Integer),
    Column("height", Integer),
    Column("format", Text),
    Column("status", ENUM("ok", "failed", "removed", name="design_image_status", create_type=False)),
    Column("error", Text),
    Column("first_seen_at", DateTime(timezone=True)),
    Column("imported_at", DateTime(timezone=True)),
    Column("removed_at", DateTime(timezone=True)),
)


def to_timestamp(mtime: float) -> datetime:
    return datetime.fromtimestamp(round(mtime, 6), tz=timezone.utc)


def mtime_key(mtime: float | datetime) -> int:
    """Microseconds since the epoch: equal for a float mtime and its stored timestamptz."""
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    return round(mtime * 1_000_000)


@dataclass(frozen=True)
class KnownRow:
    size: int
    mtime_us: int
    status: str
    hash_algorithm: str | None

    def is_current(self, f: NasFile) -> bool:
        if self.status == "removed" or self.size != f.size or self.mtime_us != mtime_key(f.mtime):
            return False
        return self.status == "failed" or self.hash_algorithm == PHASH_ALGORITHM


def known_rows(conn: Connection, shop: str, template: str) -> dict[str, KnownRow]:
    rows = conn.execute(
        text(
            "SELECT path, size_bytes, mtime, status::text, hash_algorithm FROM design_images "
            "WHERE shop = :shop AND template = :template"
        ),
        {"shop": shop, "template": template},
    )
    return {r.path: KnownRow(r.size_bytes, mtime_key(r.mtime), r.status, r.hash_algorithm) for r in rows}


def row_for(f: NasFile, facts: ImageFacts) -> dict:
    return {
        "shop": f.shop,
        "template": f.template,
        "path": f.path,
        "size_bytes": f.size,
        "mtime": to_timestamp(f.mtime),
        "sha256": facts.sha256,
        "phash": facts.phash,
        "hash_algorithm": PHASH_ALGORITHM if facts.phash else None,
        "hash_size": 16 if facts.phash else None,
        "width": facts.width,
        "height": facts.height,
        "format": facts.format,
        "status": "ok" if facts.ok else "failed",
        "error": facts.error,
    }


def upsert(conn: Connection, rows: Sequence[dict]) -> None:
    """One multi-row INSERT ... ON CONFLICT per call."""
    if not rows:
        return
    stmt = insert(design_images).values(list(rows))
    excluded = stmt.excluded
    updates = {c: excluded[c] for c in rows[0] if c not in ("shop", "template", "path")}
    updates.update(imported_at=func.now(), removed_at=None)
    conn.execute(stmt.on_conflict_do_update(constraint="design_images_shop_template_path_key", set_=updates))


def mark_removed(conn: Connection, shop: str, template: str, paths: Iterable[str]) -> int:
    paths = list(paths)
    if not paths:
        return 0
    stmt = text(
        "UPDATE design_images SET status = 'removed', removed_at = now() "
        "WHERE shop = :shop AND template = :template AND path IN :paths AND status <> 'removed'"
    ).bindparams(bindparam("paths", expanding=True))
    return conn.execute(stmt, {"shop": shop, "template": template, "paths": paths}).rowcount


def link_shops(conn: Connection, shops: Iterable[str]) -> None:
    """Point rows at the shops row of the same name, when exactly one shop has it.

    One statement for all of a run's shops: a backfill of thousands of folders must not
    cost a round trip per shop.
    """
    conn.execute(
        text(
            """
            UPDATE design_images d SET shop_id = s.id
            FROM (SELECT name, min(id) AS id FROM shops WHERE name = ANY(:shops)
                  GROUP BY name HAVING count(*) = 1) s
            WHERE d.shop = s.name AND d.shop_id IS DISTINCT FROM s.id
            """
        ),
        {"shops": sorted(set(shops))},
    )


def exact_duplicate_counts(conn: Connection, partitions: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Per (shop, template): files whose exact bytes exist elsewhere in design_images too.

    One grouped query for every partition of a run; partitions without any count 0.
    """
    partitions = sorted(set(partitions))
    if not partitions:
        return {}
    rows = conn.execute(
        text(
            """
            SELECT d.shop, d.template, count(*) AS n
            FROM design_images d
            JOIN unnest(CAST(:shops AS text[]), CAST(:templates AS text[])) AS p(shop, template)
              ON d.shop = p.shop AND d.template = p.template
            WHERE d.status = 'ok'
              AND EXISTS (SELECT 1 FROM design_images o
                          WHERE o.sha256 = d.sha256 AND o.status = 'ok' AND o.id <> d.id)
            GROUP BY d.shop, d.template
            """
        ),
        {"shops": [s for s, _ in partitions], "templates": [t for _, t in partitions]},
    )
    counts = dict.fromkeys(partitions, 0)
    counts.update({(r.shop, r.template): r.n for r in rows})
    return counts
