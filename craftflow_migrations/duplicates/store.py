"""Read hashed images and write duplicate groups."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from psycopg2.extras import execute_values
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..nas import store as nas_store
from ..nas.phash_algorithm import PHASH_ALGORITHM
from .grouping import Group, ImageRow, ThumbnailSource, hash_words

_SCOPE = "COALESCE('tenant:' || s.tenant_id, 'shop:' || d.shop)"
_CURRENT = "d.status = 'ok' AND d.phash IS NOT NULL AND d.hash_algorithm = %(algorithm)s"
_ROW_COLUMNS = (f"d.id, {_SCOPE} AS scope, d.shop, d.template, d.path, d.sha256, d.phash, d.width, d.height, "
                "d.format, d.mtime, d.size_bytes")


@dataclass(frozen=True)
class HashTable:
    """What grouping needs of every image, as columns: a million rows in a few arrays."""

    ids: np.ndarray  # (n,) int64
    scope_names: list[str]
    scopes: np.ndarray  # (n,) index into scope_names
    shas: list[str]
    words: np.ndarray  # (n, 4) uint64 pHashes

    def __len__(self) -> int:
        return len(self.ids)


def load_hashes(conn: Connection, scopes: Iterable[str] | None = None) -> HashTable:
    """Every image with a current hash (of ``scopes``, or all), streamed with COPY.

    The scope is the shop's tenant, or the shop when it is not linked to one.
    """
    params: dict = {"algorithm": PHASH_ALGORITHM, "scopes": sorted(set(scopes or ()))}
    where = "" if scopes is None else f" AND {_SCOPE} = ANY(%(scopes)s)"
    cursor = conn.connection.dbapi_connection.cursor()
    query = cursor.mogrify(
        f"SELECT d.id, {_SCOPE}, d.sha256, d.phash FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id "
        f"WHERE {_CURRENT}{where} ORDER BY d.id", params).decode()
    buffer = io.StringIO()
    # CSV, not COPY's text format: a shop folder's name may hold a tab, a newline or a
    # backslash, and csv reads back exactly the text that was written.
    cursor.copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT csv)", buffer)
    buffer.seek(0)
    ids, scope_of, shas, phashes = [], [], [], []
    codes: dict[str, int] = {}
    for image_id, scope, sha, phash in csv.reader(buffer):
        ids.append(int(image_id))
        scope_of.append(codes.setdefault(scope, len(codes)))
        shas.append(sha)
        phashes.append(phash)
    return HashTable(np.array(ids, dtype=np.int64), list(codes), np.array(scope_of, dtype=np.int64), shas,
                     hash_words(phashes) if phashes else np.empty((0, 4), dtype=np.uint64))


def load_rows(conn: Connection, ids: Iterable[int]) -> dict[int, ImageRow]:
    """The images of ``ids`` in full (only the grouped ones are ever asked for)."""
    ids = sorted({int(i) for i in ids})
    if not ids:
        return {}
    rows = conn.execute(text(
        f"SELECT {_ROW_COLUMNS} FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id "
        "WHERE d.id = ANY(:ids)"), {"ids": ids})
    return {r.id: ImageRow(*r) for r in rows}


def load_images(conn: Connection, scopes: Iterable[str] | None = None) -> list[ImageRow]:
    """Every image with a current hash (of ``scopes``, or all), in full: for tests and small sets."""
    table = load_hashes(conn, scopes)
    rows = load_rows(conn, table.ids)
    return [rows[i] for i in table.ids.tolist()]


def thumbnail_source(conn: Connection) -> ThumbnailSource:
    def fetch(shas: Sequence[str]) -> Mapping[str, bytes]:
        return nas_store.thumbnails(conn, shas)
    return fetch


def take_changed_scopes(conn: Connection) -> set[str]:
    """Scopes to regroup, taken (and cleared) inside the caller's locked transaction.

    A changed shop's scope now, and every scope where one of its images sat in a group
    (a shop newly linked to a tenant leaves its old scope too).
    """
    shops = conn.execute(text("DELETE FROM design_duplicate_dirty_shops RETURNING shop")).scalars().all()
    if not shops:
        return set()
    rows = conn.execute(
        text(
            f"""
            SELECT DISTINCT {_SCOPE} FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id
            WHERE d.shop = ANY(:shops)
            UNION
            SELECT DISTINCT g.scope FROM design_duplicate_groups g
            JOIN design_duplicate_members m ON m.group_id = g.id
            JOIN design_images d ON d.id = m.image_id WHERE d.shop = ANY(:shops)
            """
        ),
        {"shops": list(shops)},
    )
    return set(rows.scalars())


# Two duplicates runs at once (two containers deploying) take turns on this lock.
GROUPS_LOCK_KEY = 7_301_845_112_004_200


def lock_groups(conn: Connection) -> None:
    """Serialize regrouping: held to the end of the caller's transaction.

    Take it before reading design_images: under READ COMMITTED every later statement of the
    transaction then sees what the run before it committed, so the last run's groups win
    whole, never a mix of both.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": GROUPS_LOCK_KEY})


def replace_groups(conn: Connection, groups: list[Group], threshold: int,
                   scopes: Iterable[str] | None = None) -> None:
    """Swap in the groups of ``scopes`` (or all groups) in one transaction: readers never see half."""
    if scopes is None:
        conn.execute(text("DELETE FROM design_duplicate_groups"))
    else:
        conn.execute(text("DELETE FROM design_duplicate_groups WHERE scope = ANY(:s)"), {"s": sorted(set(scopes))})
    if not groups:
        return
    # Multi-row statements: tens of thousands of groups in a few round trips, not one each.
    cursor = conn.connection.dbapi_connection.cursor()
    group_ids = [r[0] for r in execute_values(
        cursor,
        "INSERT INTO design_duplicate_groups (scope, kind, keep_image_id, keep_reason, size, max_distance, threshold) "
        "VALUES %s RETURNING id",
        [(g.scope, g.kind, g.keep.id, g.keep_reason, len(g.members), g.max_distance, threshold) for g in groups],
        page_size=5000, fetch=True)]
    execute_values(
        cursor, "INSERT INTO design_duplicate_members (group_id, image_id, distance_to_keep, is_keep) VALUES %s",
        [(gid, m.id, g.distances[m.id], m.id == g.keep.id) for gid, g in zip(group_ids, groups, strict=True)
         for m in g.members], page_size=5000)


def stored_groups(conn: Connection, shop: str | None = None) -> list[Group]:
    """Stored groups with their members (only those with a member in ``shop``, when given)."""
    rows = conn.execute(text(
        """
        SELECT g.id AS group_id, g.kind, g.keep_image_id, g.keep_reason, m.distance_to_keep, d.id, g.scope, d.shop,
               d.template, d.path, d.sha256, d.phash, d.width, d.height, d.format, d.mtime, d.size_bytes
        FROM design_duplicate_groups g JOIN design_duplicate_members m ON m.group_id = g.id
        JOIN design_images d ON d.id = m.image_id
        WHERE CAST(:shop AS text) IS NULL OR g.id IN (
            SELECT m2.group_id FROM design_duplicate_members m2
            JOIN design_images d2 ON d2.id = m2.image_id WHERE d2.shop = :shop)
        ORDER BY g.scope, g.kind, g.id
        """), {"shop": shop})
    groups: dict[int, Group] = {}
    for r in rows:
        image = ImageRow(r.id, r.scope, r.shop, r.template, r.path, r.sha256, r.phash, r.width, r.height, r.format,
                         r.mtime, r.size_bytes)
        g = groups.get(r.group_id)
        if g is None:
            g = groups[r.group_id] = Group(r.kind, r.scope, [], image, r.keep_reason, id=r.group_id)
        g.members.append(image)
        g.distances[image.id] = r.distance_to_keep
        if image.id == r.keep_image_id:
            g.keep = image
    for g in groups.values():
        g.members.sort(key=lambda m: m.sort_key)
    return sorted(groups.values(), key=lambda g: (g.scope, g.kind, g.members[0].sort_key))


def scope_labels(conn: Connection) -> dict[str, str]:
    """A readable name for each scope that has groups: the tenant's name, or the shop's."""
    rows = conn.execute(text(
        """
        SELECT DISTINCT g.scope, t.name AS tenant FROM design_duplicate_groups g
        LEFT JOIN tenants t ON g.scope = 'tenant:' || t.id
        """))
    labels = {}
    for r in rows:
        kind, _, key = r.scope.partition(":")
        labels[r.scope] = (f"{r.tenant} (tenant {key})" if kind == "tenant" and r.tenant
                           else f"Shop {key} (not linked to a tenant)" if kind == "shop" else r.scope)
    return labels
