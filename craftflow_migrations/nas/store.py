"""design_images rows: what is known of a run's partitions, bulk upserts, removals.

Every query covers all of a run's partitions (or all of a batch's files) at once, through
arrays, so thousands of folders cost a few round trips, not a few per folder.

Two imports of one folder at once (two deploys) cannot undo each other: every write carries
the time its listing began (``listed_at``, PostgreSQL's clock), and a row is only changed by
a listing at least as new as the one that last wrote it. A file one import saw removed is
never resurrected by an import that listed earlier.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from psycopg2 import Binary
from psycopg2.errors import UniqueViolation
from psycopg2.extras import execute_values
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..settings import get_settings
from .copy_binary import copy_rows
from .listing import NasFile
from .phash_algorithm import HASH_SIZE, PHASH_ALGORITHM
from .thumbnail_packs import PackedThumbnail, PackWriter, read_packed

if TYPE_CHECKING:
    from .hashing import ImageFacts

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_timestamp(mtime_us: int) -> datetime:
    """Exact: integer microseconds to timestamptz and back never disagree by a microsecond."""
    return EPOCH + timedelta(microseconds=mtime_us)


def mtime_us(value: datetime) -> int:
    return (value - EPOCH) // timedelta(microseconds=1)


def db_now(conn: Connection) -> datetime:
    """PostgreSQL's clock, shared by every machine that writes rows."""
    return conn.execute(text("SELECT clock_timestamp()")).scalar_one()


@dataclass(frozen=True, slots=True)
class KnownRow:
    size: int
    mtime_us: int
    status: str
    hash_algorithm: str | None

    def is_current(self, f: NasFile, max_file_bytes: int) -> bool:
        if self.status == "removed" or self.size != f.size or self.mtime_us != f.mtime_us:
            return False
        if self.status == "skipped":
            return f.size > max_file_bytes  # a raised cap imports it
        return self.status == "failed" or self.hash_algorithm == PHASH_ALGORITHM


_KNOWN = """
    SELECT d.shop, d.template, d.path, d.size_bytes, d.mtime, d.status::text AS status, d.hash_algorithm
    FROM design_images d
"""


def known_rows(conn: Connection, partitions: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, KnownRow]]:
    """Rows of every (shop, template) given, in one query."""
    partitions = sorted(set(partitions))
    out: dict[tuple[str, str], dict[str, KnownRow]] = {p: {} for p in partitions}
    if not partitions:
        return out
    rows = conn.execute(
        text(_KNOWN + "JOIN unnest(CAST(:shops AS text[]), CAST(:templates AS text[])) AS p(shop, template) "
             "ON d.shop = p.shop AND d.template = p.template"),
        {"shops": [s for s, _ in partitions], "templates": [t for _, t in partitions]},
    )
    for r in rows:
        out[(r.shop, r.template)][r.path] = KnownRow(r.size_bytes, mtime_us(r.mtime), r.status, r.hash_algorithm)
    return out


def known_files(conn: Connection, files: Sequence[NasFile]) -> dict[tuple[str, str, str], KnownRow]:
    """Rows of exactly these files, in one query (a retried batch skips what it committed)."""
    if not files:
        return {}
    rows = conn.execute(
        text(_KNOWN + "JOIN unnest(CAST(:shops AS text[]), CAST(:templates AS text[]), CAST(:paths AS text[])) "
             "AS f(shop, template, path) ON d.shop = f.shop AND d.template = f.template AND d.path = f.path"),
        {"shops": [f.shop for f in files], "templates": [f.template for f in files], "paths": [f.path for f in files]},
    )
    return {(r.shop, r.template, r.path): KnownRow(r.size_bytes, mtime_us(r.mtime), r.status, r.hash_algorithm)
            for r in rows}


class DesignImageRow(NamedTuple):
    """One ``design_images`` row as the import writes it, in the COPY's column order.

    A tuple, not a dict: built and encoded for every file of a batch, a dict of 16 keys and
    its conversion to a tuple for COPY cost 3.5 us a file (``benchmarks/README.md``, item 44).
    """

    shop: str
    template: str
    path: str
    path_bytes: bytes | None
    size_bytes: int
    mtime_us: int  # the ``mtime`` column: integer microseconds since the Unix epoch, exact
    sha256: str | None
    phash: str | None
    hash_algorithm: str | None
    hash_size: int | None
    width: int | None
    height: int | None
    format: str | None
    status: str
    error: str | None
    listed_at: datetime
    shop_id: int | None  # the shops row of the folder's name (:func:`shop_ids`); None keeps the row's


def row_for(f: NasFile, facts: ImageFacts, listed_at: datetime, status: str | None = None,
            shop_id: int | None = None) -> DesignImageRow:
    return DesignImageRow(
        f.shop, f.template, f.path, f.raw_path, f.size, f.mtime_us, facts.sha256, facts.phash,
        PHASH_ALGORITHM if facts.phash else None, HASH_SIZE if facts.phash else None,
        facts.width, facts.height, facts.format, status or ("ok" if facts.ok else "failed"), facts.error, listed_at,
        shop_id)


_COLUMNS = tuple("mtime" if name == "mtime_us" else name for name in DesignImageRow._fields)
_TYPES = ("text", "text", "text", "bytea", "int8", "timestamptz_us", "text", "text", "text",
          "int2", "int4", "int4", "text", "text", "text", "timestamptz", "int8")
_INCOMING = "incoming_design_images"
_UPDATED = {c: f"EXCLUDED.{c}" for c in _COLUMNS[3:]} | {"shop_id": "COALESCE(EXCLUDED.shop_id, design_images.shop_id)"}
_UPSERT = f"""
    INSERT INTO design_images ({", ".join(_COLUMNS)}) SELECT {", ".join(_COLUMNS)} FROM {_INCOMING}
    ON CONFLICT ON CONSTRAINT design_images_shop_template_path_key DO UPDATE SET
        {", ".join(f"{c} = {value}" for c, value in _UPDATED.items())}, imported_at = now(), removed_at = NULL
    WHERE design_images.listed_at IS NULL OR design_images.listed_at <= EXCLUDED.listed_at
"""
# The shops row of each folder name that exactly one shop has (a name two tenants share links neither).
_UNIQUE_SHOPS = "SELECT name, min(id) AS id FROM shops WHERE name = ANY(:shops) GROUP BY name HAVING count(*) = 1"


def shop_ids(conn: Connection, shops: Iterable[str]) -> dict[str, int]:
    """The id of the one shop named like each folder, where exactly one is: a batch writes its
    rows linked. Linked afterwards (:func:`link_shops`), each row was written twice: 23 us of
    PostgreSQL a file, a new version of the row and of each of its index entries."""
    return {r.name: r.id for r in conn.execute(text(_UNIQUE_SHOPS), {"shops": sorted(set(shops))})}


def upsert(conn: Connection, rows: Sequence[DesignImageRow], fresh: Sequence[DesignImageRow] = ()) -> int:
    """Insert or update rows; rows a newer listing wrote are left alone.

    ``rows`` go by binary COPY into a temporary table of this transaction, then in one
    ``INSERT ... SELECT ... ON CONFLICT``: a third of the CPU of multi-row ``INSERT``s on both
    sides. The temporary table is dropped again, so several calls may share a transaction and
    a pooled session keeps nothing.

    ``fresh`` rows are files that had no row when their batch began (a first import): they go
    by COPY straight into design_images, a fifth cheaper on both sides than through the
    temporary table. COPY has no ON CONFLICT: when another import has inserted one of them
    since (two deploys at once), the COPY rolls back to its savepoint and they take the
    upsert's way, guarded by ``listed_at`` like the rest.
    """
    copied = 0
    if fresh:
        try:
            with conn.begin_nested():
                copy_rows(conn, "design_images", _COLUMNS, _TYPES, fresh)
            copied = len(fresh)
        except UniqueViolation:
            rows = [*rows, *fresh]
    if not rows:
        return copied
    conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {_INCOMING} AS SELECT {', '.join(_COLUMNS)} "
                         "FROM design_images WITH NO DATA")
    copy_rows(conn, _INCOMING, _COLUMNS, _TYPES, rows)
    count = conn.exec_driver_sql(_UPSERT).rowcount
    conn.exec_driver_sql(f"DROP TABLE {_INCOMING}")
    return copied + count


# The keys as char(64)[], the column's own type. A plain list travels as text[], and
# ``char(64) = ANY(text[])`` casts the column: no index, a scan of the whole table for every
# flush of every import (70 ms at 100,000 thumbnails, growing with the table).
_HEX_KEYS = re.compile(r"[0-9a-f]{64}(,[0-9a-f]{64})*")
STORED_THUMBNAILS = "SELECT sha256 FROM design_thumbnails WHERE sha256 = ANY(CAST(:s AS char(64)[]))"
THUMBNAILS = ("SELECT sha256, jpeg, pack, pack_offset, pack_length FROM design_thumbnails "
              "WHERE sha256 = ANY(CAST(:s AS char(64)[]))")
_IN_POSTGRES = (("sha256", "jpeg"), ("text", "bytea"))
_IN_PACKS = (("sha256", "pack", "pack_offset", "pack_length"), ("text", "text", "int8", "int4"))
# Selected in this order, a row is a PackedThumbnail.
PACKED_COLUMNS = ", ".join(_IN_PACKS[0])

log = logging.getLogger("craftflow_migrations.thumbnails")


# Taken shared by every flush that stores thumbnails and exclusive by the prune of unshown ones
# (:mod:`.thumbnail_prune`): a flush that finds a picture stored keeps it stored until its image
# rows commit. Transaction-level: released at commit, never held by a pooled connection.
THUMBNAILS_LOCK_KEY = 0x43465448_554D4253  # "CFTHUMBS"


def sha256_array(shas: Iterable[str]) -> str:
    """The sha256s as one ``char(64)[]`` literal, checked to be lowercase hex (which needs no
    quoting): as a list, psycopg2 quoted each of a flush's 5,000 strings apart."""
    keys = ",".join(shas)
    if not _HEX_KEYS.fullmatch(keys):
        raise ValueError("thumbnails are keyed by the sha256 of their file, in lowercase hex")
    return "{" + keys + "}"


def lock_thumbnails(conn: Connection, exclusive: bool = False) -> None:
    conn.execute(text(f"SELECT pg_advisory_xact_lock{'' if exclusive else '_shared'}(:k)"),
                 {"k": THUMBNAILS_LOCK_KEY})


# Which database wrote a thumbnail pack: the cluster's system identifier (another server's
# differs) and the database's name (another database of the same server's differs). Every role
# may call pg_control_system().
DATABASE_IDENTITY = "(SELECT system_identifier::text FROM pg_control_system()) || '/' || current_database()"


def register_pack(engine: Engine, name: str) -> None:
    """Record ``name`` as a pack this database writes, committed before its first byte is written:
    a step killed before any row points into the pack leaves it registered, for the prune."""
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO thumbnail_packs (name, written_by) VALUES (:n, {DATABASE_IDENTITY}) "
                          "ON CONFLICT (name) DO NOTHING"), {"n": name})


def packs_written_here(conn: Connection) -> set[str]:
    """The packs this database registered (not another's sharing the folder, nor the original's
    of a restored copy)."""
    return set(conn.execute(text(f"SELECT name FROM thumbnail_packs WHERE written_by = {DATABASE_IDENTITY}"))
               .scalars())


def forget_pack(conn: Connection, name: str) -> None:
    conn.execute(text("DELETE FROM thumbnail_packs WHERE name = :n"), {"n": name})


def save_thumbnails(conn: Connection, thumbnails: dict[str, bytes], packs: PackWriter | None = None) -> None:
    """Content-addressed: a sha256 already there keeps its thumbnail (same bytes, same picture).

    The new ones go into ``packs`` (appended and made durable before this transaction can
    commit: a row never points at bytes that are not on disk), or, without packs, into the
    table itself. Either way their rows go in by binary COPY (a third of the server's CPU of
    a multi-row INSERT, whose bytea travels as hex). COPY has no ON CONFLICT: the sha256s
    already stored are looked up first, and when another import stores one of the rest
    between the look-up and the COPY (byte-identical files in two batch steps at once), the
    COPY is rolled back to its savepoint and the same rows go in with ``ON CONFLICT DO
    NOTHING`` (in packs, the other import's copy is the one indexed; ours is never read).
    The transaction holds :data:`THUMBNAILS_LOCK_KEY` shared from here to its commit.
    """
    if not thumbnails:
        return
    lock_thumbnails(conn)
    stored = {r.sha256 for r in conn.execute(text(STORED_THUMBNAILS), {"s": sha256_array(thumbnails)})}
    new = [(sha, data) for sha, data in thumbnails.items() if sha not in stored]
    if not new:
        return
    if packs is None:
        (columns, types), rows = _IN_POSTGRES, new
    else:
        (columns, types) = _IN_PACKS
        rows = packs.append_all(new)
    try:
        with conn.begin_nested():
            copy_rows(conn, "design_thumbnails", columns, types, rows)
    except UniqueViolation:
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            execute_values(cursor, f"INSERT INTO design_thumbnails ({', '.join(columns)}) VALUES %s "
                           "ON CONFLICT (sha256) DO NOTHING",
                           [tuple(Binary(v) if isinstance(v, bytes) else v for v in row) for row in rows],
                           page_size=500)
        finally:
            cursor.close()


def thumbnails(conn: Connection, shas: Iterable[str], folder: Path | None = None) -> dict[str, bytes]:
    """The stored thumbnails of ``shas``, wherever each lies (in the table, or in a pack of
    ``folder``: by default the configured ``CRAFTFLOW_THUMBNAIL_DIR``). One that cannot be read
    is left out, with one warning line per pack that says why."""
    found: dict[str, bytes] = {}
    packed: list[PackedThumbnail] = []
    for r in conn.execute(text(THUMBNAILS), {"s": sorted(set(shas))}):
        if r.jpeg is not None:
            found[r.sha256] = bytes(r.jpeg)
        else:
            packed.append(PackedThumbnail(r.sha256, r.pack, r.pack_offset, r.pack_length))
    if packed:
        if folder is None:
            folder = get_settings().nas.thumbnail_folder
        from_packs, problems = read_packed(folder, packed)
        found.update(from_packs)
        for line in problems:
            log.warning(line)
    return found


@dataclass(frozen=True)
class ThumbnailCheck:
    """Where the stored thumbnails are, and which of them could not be read back."""

    in_postgres: int
    in_packs: int
    packs: int
    pack_bytes: int
    unreadable: int
    problems: list[str]


def check_thumbnails(conn: Connection, folder: Path, chunk: int = 10_000) -> ThumbnailCheck:
    """Read every packed thumbnail back from ``folder`` (by sha256, ``chunk`` rows at a time), as
    the report would: after moving the folder, this says whether every picture is found."""
    in_postgres, in_packs = conn.execute(text(
        "SELECT count(*) FILTER (WHERE pack IS NULL), count(*) FILTER (WHERE pack IS NOT NULL) "
        "FROM design_thumbnails")).one()
    packs: set[str] = set()
    pack_bytes = unreadable = 0
    problems: list[str] = []
    after = ""
    while True:
        rows = conn.execute(text(
            f"SELECT {PACKED_COLUMNS} FROM design_thumbnails "
            "WHERE pack IS NOT NULL AND sha256 > :after ORDER BY sha256 LIMIT :n"), {"after": after, "n": chunk}).all()
        if not rows:
            break
        after = rows[-1].sha256
        found, lines = read_packed(folder, [PackedThumbnail(*r) for r in rows])
        packs.update(r.pack for r in rows)
        pack_bytes += sum(len(v) for v in found.values())
        unreadable += len(rows) - len(found)
        problems.extend(line for line in lines if line not in problems)
    return ThumbnailCheck(in_postgres, in_packs, len(packs), pack_bytes, unreadable, problems)


def mark_removed(conn: Connection, removed: Sequence[tuple[str, str, str]], listed_at: datetime) -> int:
    """Mark (shop, template, path) rows removed, unless a newer listing wrote them since."""
    if not removed:
        return 0
    return conn.execute(
        text(
            """
            UPDATE design_images d SET status = 'removed', removed_at = now(), listed_at = :listed_at
            FROM unnest(CAST(:shops AS text[]), CAST(:templates AS text[]), CAST(:paths AS text[]))
                 AS r(shop, template, path)
            WHERE d.shop = r.shop AND d.template = r.template AND d.path = r.path AND d.status <> 'removed'
              AND (d.listed_at IS NULL OR d.listed_at <= :listed_at)
            """
        ),
        {"shops": [r[0] for r in removed], "templates": [r[1] for r in removed], "paths": [r[2] for r in removed],
         "listed_at": listed_at},
    ).rowcount


def link_shops(conn: Connection, shops: Iterable[str]) -> set[str]:
    """Point rows at the shops row of the same name, when exactly one shop has it: rows imported
    before their shop existed or was renamed to the folder's name (a batch links its own rows).

    One statement for all of a run's shops: a backfill of thousands of folders must not
    cost a round trip per shop. Returns the shops whose rows moved (their duplicate scope
    changed).
    """
    rows = conn.execute(
        text(
            """
            UPDATE design_images d SET shop_id = s.id
            FROM (""" + _UNIQUE_SHOPS + """) s
            WHERE d.shop = s.name AND d.shop_id IS DISTINCT FROM s.id
            RETURNING d.shop
            """
        ),
        {"shops": sorted(set(shops))},
    )
    return {r.shop for r in rows}


def duplicates_pending(conn: Connection) -> bool:
    """Whether a shop was marked since duplicates were last grouped (one indexed look-up)."""
    return bool(conn.execute(text("SELECT EXISTS (SELECT 1 FROM design_duplicate_dirty_shops)")).scalar())


def save_fingerprints(conn: Connection, fingerprints: dict[str, str]) -> None:
    """Record each folder's listing fingerprint at its complete import (one statement)."""
    if fingerprints:
        keys = sorted(fingerprints)
        conn.execute(text(
            "INSERT INTO nas_partition_state (partition_key, fingerprint) "
            "SELECT * FROM unnest(CAST(:k AS text[]), CAST(:f AS text[])) "
            "ON CONFLICT (partition_key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, imported_at = now()"),
            {"k": keys, "f": [fingerprints[k] for k in keys]})


def saved_fingerprints(conn: Connection, keys: Sequence[str]) -> dict[str, str]:
    rows = conn.execute(text("SELECT partition_key, fingerprint FROM nas_partition_state "
                             "WHERE partition_key = ANY(:k)"), {"k": list(keys)})
    return {r.partition_key: r.fingerprint for r in rows}


def mark_shops_changed(conn: Connection, shops: Iterable[str]) -> None:
    """The duplicates step regroups these shops' scopes next time (and only those)."""
    shops = sorted(set(shops))
    if shops:
        conn.execute(text("INSERT INTO design_duplicate_dirty_shops (shop) SELECT unnest(CAST(:s AS text[])) "
                          "ON CONFLICT (shop) DO UPDATE SET marked_at = now()"), {"s": shops})


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
