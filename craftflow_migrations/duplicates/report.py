"""The duplicates report: an index per tenant and shop, and paged pages per scope.

Rendered with Jinja2 templates (autoescaped: file names are data, never markup). The
report never reads the NAS: every picture is the thumbnail stored when the file was
imported, written once under ``thumbs/<ab>/<sha256>.jpg`` (content-addressed, so a later run
writes only new ones).

A run writes its pages into a new folder and switches ``index.html`` to it last, with a
rename: someone reading the report never sees half of one run and half of another.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..long_lived import long_lived
from .grouping import Group, ThumbnailSource

if TYPE_CHECKING:
    import jinja2

THUMB_PX = 224
PAGE_SIZE = 50  # groups per page: a few hundred thumbnails, quick to open


def bytes_freed(group: Group) -> int:
    """What removing every copy but the one to keep would free."""
    return sum(m.size_bytes for m in group.members if m.id != group.keep.id)


def ordered(groups: list[Group]) -> list[Group]:
    """The order a shop owner works in: the biggest saving first (the report and the CLI)."""
    return sorted(groups, key=lambda g: (g.scope, -bytes_freed(g), g.kind, g.members[0].sort_key))


def group_record(group: Group) -> dict:
    """A group as plain data, for ``craftflow-migrate duplicates --json``."""
    def member(m) -> dict:
        return {"image_id": m.id, "shop": m.shop, "template": m.template, "path": m.path, "sha256": m.sha256,
                "width": m.width, "height": m.height, "format": m.format, "size_bytes": m.size_bytes,
                "distance": group.distances.get(m.id, 0), "keep": m.id == group.keep.id}
    return {"id": group.id, "kind": group.kind, "scope": group.scope, "keep_reason": group.keep_reason,
            "max_distance": group.max_distance, "bytes_freed": bytes_freed(group), "keep": member(group.keep),
            "members": [member(m) for m in group.members]}


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


@lru_cache(maxsize=1)
def load_templates() -> jinja2.Environment:
    """The report's Jinja2 templates, loaded on first use: jinja2 costs 0.14 s to import, which
    the worker and every step paid with the job's definitions whether or not a report was due."""
    # Kept for the process: beside 100,000 hashes, importing jinja2 ran a full collection (0.2 s).
    with long_lived():
        import jinja2

        env = jinja2.Environment(loader=jinja2.PackageLoader("craftflow_migrations.duplicates", "templates"),
                                 autoescape=True, trim_blocks=True, lstrip_blocks=True)
        env.filters["bytes"] = human_bytes
    return env


@dataclass
class ShopSummary:
    name: str
    groups: int = 0
    files: int = 0
    bytes_freed: int = 0


@dataclass
class ScopeSummary:
    scope: str
    label: str
    slug: str
    groups: list[Group] = field(default_factory=list)
    shops: dict[str, ShopSummary] = field(default_factory=dict)

    # Computed once, after summarize() has filled the groups: every page of the scope shows
    # them, and summing a million-image scope's 18,000 groups for each of its 375 pages took
    # 16 of the report's 21 s.
    @cached_property
    def files(self) -> int:
        return sum(len(g.members) for g in self.groups)

    @cached_property
    def bytes_freed(self) -> int:
        return sum(bytes_freed(g) for g in self.groups)

    @property
    def pages(self) -> int:
        return max(1, -(-len(self.groups) // PAGE_SIZE))


def slug(scope: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9]+", "-", scope).strip("-")[:40] or "scope"
    return f"{readable}-{hashlib.sha1(scope.encode()).hexdigest()[:8]}"


def summarize(groups: list[Group], labels: Mapping[str, str]) -> list[ScopeSummary]:
    """Per scope and per shop: groups, files and bytes freed; a scope's groups biggest win first."""
    scopes: dict[str, ScopeSummary] = {}
    for g in groups:
        summary = scopes.get(g.scope)
        if summary is None:
            summary = scopes[g.scope] = ScopeSummary(g.scope, labels.get(g.scope, g.scope), slug(g.scope))
        summary.groups.append(g)
        per_shop: dict[str, list] = defaultdict(list)
        for m in g.members:
            per_shop[m.shop].append(m)
        for shop, members in per_shop.items():
            s = summary.shops.setdefault(shop, ShopSummary(shop))
            s.groups += 1
            s.files += len(members)
            s.bytes_freed += sum(m.size_bytes for m in members if m.id != g.keep.id)
    for summary in scopes.values():
        summary.groups = ordered(summary.groups)
        summary.shops = dict(sorted(summary.shops.items()))
    return sorted(scopes.values(), key=lambda s: (s.label, s.scope))


COPIES_CSV = "copies.csv"


def _write_copies(path: Path, groups: list[Group]) -> None:
    """Every file but the one to keep, a row each: the list a shop owner works through."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group_id", "kind", "shop", "template", "path", "size_bytes", "distance_bits",
                         "keep_shop", "keep_template", "keep_path", "keep_reason"])
        for g in groups:
            for m in g.members:
                if m.id != g.keep.id:
                    writer.writerow([g.id, g.kind, m.shop, m.template, m.path, m.size_bytes, g.distances.get(m.id, 0),
                                     g.keep.shop, g.keep.template, g.keep.path, g.keep_reason])


def thumbnail_name(sha: str) -> str:
    """Where a thumbnail lives under ``thumbs/``: 256 folders, so none holds a million files."""
    return f"{sha[:2]}/{sha}.jpg"


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_thumbnails(groups: list[Group], thumbs: Path, source: ThumbnailSource) -> set[str]:
    """Write the thumbnails not yet on disk, a few thousand at a time; return those present.

    Creating files is most of the report's time at catalogue size (37,000 of them for a
    million images: 12 of its 21 s in one folder, written one by one): they go into 256
    folders, written by a few threads (the system calls release the GIL and the waits overlap).
    """
    wanted = sorted({m.sha256 for g in groups for m in g.members})
    present = {sha for sha in wanted if (thumbs / thumbnail_name(sha)).exists()}
    missing = [sha for sha in wanted if sha not in present]
    for prefix in sorted({sha[:2] for sha in missing}):
        (thumbs / prefix).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4, thread_name_prefix="report-thumbs") as pool:
        for start in range(0, len(missing), 2000):
            found = source(missing[start:start + 2000])
            list(pool.map(_write_file, [str(thumbs / thumbnail_name(sha)) for sha in found], found.values()))
            present.update(found)
    return present


def write_report(groups: list[Group], out_dir: Path, thumbnails: ThumbnailSource,
                 labels: Mapping[str, str] | None = None) -> Path:
    """Write ``index.html``, one paged set of pages per scope and ``thumbs/``; return the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = _write_thumbnails(groups, out_dir / "thumbs", thumbnails)
    scopes = summarize(groups, labels or {})
    pages_dir = f"pages-{time.time_ns()}"
    for summary in scopes:
        folder = out_dir / pages_dir / summary.slug
        folder.mkdir(parents=True)
        for page in range(1, summary.pages + 1):
            chunk = summary.groups[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
            html = load_templates().get_template("scope.html").render(
                scope=summary, groups=chunk, page=page, first_index=(page - 1) * PAGE_SIZE, thumbs=shown,
                px=THUMB_PX, bytes_freed=bytes_freed, thumbnail_name=thumbnail_name,
                thumbs_total=sum(1 for g in chunk for m in g.members if m.sha256 in shown))
            (folder / f"page-{page}.html").write_text(html, encoding="utf-8")
        _write_copies(folder / COPIES_CSV, summary.groups)
    exact = sum(g.kind == "exact" for g in groups)
    html = load_templates().get_template("index.html").render(
        scopes=scopes, pages_dir=pages_dir, copies_csv=COPIES_CSV, px=THUMB_PX, exact=exact, near=len(groups) - exact,
        files=sum(len(g.members) for g in groups), freed=sum(bytes_freed(g) for g in groups))
    index = out_dir / "index.html"
    staged = out_dir / "index.html.tmp"
    staged.write_text(html, encoding="utf-8")
    os.replace(staged, index)
    for old in out_dir.glob("pages-*"):
        if old.name != pages_dir:
            shutil.rmtree(old, ignore_errors=True)
    return index
