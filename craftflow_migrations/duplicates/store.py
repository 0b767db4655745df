"""Read hashed images and write duplicate groups."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..nas.hashing import PHASH_ALGORITHM
from .grouping import Group, ImageRow

_SCOPE = "COALESCE('tenant:' || s.tenant_id, 'shop:' || d.shop)"


def load_images(conn: Connection, scopes: Iterable[str] | None = None) -> list[ImageRow]:
    """Images with a current hash (of ``scopes``, or all); the scope is the shop's tenant, or
    the shop when unlinked."""
    where = "" if scopes is None else f"AND {_SCOPE} = ANY(:scopes)"
    rows = conn.execute(
        text(
            f"""
            SELECT d.id, {_SCOPE} AS scope, d.shop, d.template,
                   d.path, d.sha256, d.phash, d.width, d.height, d.format, d.mtime
            FROM design_images d LEFT JOIN shops s ON s.id = d.shop_id
            WHERE d.status = 'ok' AND d.phash IS NOT NULL AND d.hash_algorithm = :algorithm {where}
            """
        ),
        {"algorithm": PHASH_ALGORITHM, "scopes": sorted(set(scopes or ()))},
    )
    return [ImageRow(*r) for r in rows]


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


def has_changes(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT EXISTS (SELECT 1 FROM design_duplicate_dirty_shops)")).scalar())


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
    for g in groups:
        group_id = conn.execute(
            text(
                "INSERT INTO design_duplicate_groups (scope, kind, keep_image_id, keep_reason, size, max_distance, threshold) "
                "VALUES (:scope, :kind, :keep, :reason, :size, :maxd, :threshold) RETURNING id"
            ),
            {"scope": g.scope, "kind": g.kind, "keep": g.keep.id, "reason": g.keep_reason,
             "size": len(g.members), "maxd": g.max_distance, "threshold": threshold},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO design_duplicate_members (group_id, image_id, distance_to_keep, is_keep) "
                "VALUES (:g, :i, :d, :k)"
            ),
            [{"g": group_id, "i": m.id, "d": g.distances[m.id], "k": m.id == g.keep.id} for m in g.members],
        )


def stored_groups(conn: Connection) -> list[Group]:
    """Every stored group, with its members, for the report."""
    rows = conn.execute(text(
        """
        SELECT g.id AS group_id, g.kind, g.keep_image_id, g.keep_reason, m.distance_to_keep, d.id, g.scope, d.shop,
               d.template, d.path, d.sha256, d.phash, d.width, d.height, d.format, d.mtime
        FROM design_duplicate_groups g JOIN design_duplicate_members m ON m.group_id = g.id
        JOIN design_images d ON d.id = m.image_id
        ORDER BY g.scope, g.kind, g.id
        """))
    groups: dict[int, Group] = {}
    for r in rows:
        image = ImageRow(r.id, r.scope, r.shop, r.template, r.path, r.sha256, r.phash, r.width, r.height, r.format,
                         r.mtime)
        g = groups.get(r.group_id)
        if g is None:
            g = groups[r.group_id] = Group(r.kind, r.scope, [], image, r.keep_reason)
        g.members.append(image)
        g.distances[image.id] = r.distance_to_keep
        if image.id == r.keep_image_id:
            g.keep = image
    for g in groups.values():
        g.members.sort(key=lambda m: m.sort_key)
    return sorted(groups.values(), key=lambda g: (g.scope, g.kind, g.members[0].sort_key))


def groups_for_shop(conn: Connection, shop: str | None) -> list[dict]:
    """Stored groups with at least one member in ``shop`` (all groups when None)."""
    rows = conn.execute(
        text(
            """
            SELECT g.id, g.kind, g.scope, g.keep_reason, g.max_distance, g.threshold,
                   d.shop, d.template, d.path, d.width, d.height, d.format, m.distance_to_keep, m.is_keep
            FROM design_duplicate_groups g
            JOIN design_duplicate_members m ON m.group_id = g.id
            JOIN design_images d ON d.id = m.image_id
            WHERE CAST(:shop AS text) IS NULL OR g.id IN (
                SELECT m2.group_id FROM design_duplicate_members m2
                JOIN design_images d2 ON d2.id = m2.image_id WHERE d2.shop = :shop)
            ORDER BY g.kind, g.id, m.is_keep DESC, d.shop, d.template, d.path
            """
        ),
        {"shop": shop},
    )
    groups: dict[int, dict] = {}
    for r in rows:
        g = groups.setdefault(r.id, {"id": r.id, "kind": r.kind, "scope": r.scope, "keep_reason": r.keep_reason,
                                     "max_distance": r.max_distance, "threshold": r.threshold, "keep": None,
                                     "members": []})
        member = {"shop": r.shop, "template": r.template, "path": r.path, "width": r.width, "height": r.height,
                  "format": r.format, "distance": r.distance_to_keep, "keep": r.is_keep}
        g["members"].append(member)
        if r.is_keep:
            g["keep"] = member
    return list(groups.values())
