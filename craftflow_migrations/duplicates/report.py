"""A static HTML page of duplicate groups, from the thumbnails the import stored.

Rendered with Jinja2 (autoescaped: file names are data, never markup). The report never
reads the NAS: every picture is the thumbnail made when the file was imported, written
once under ``thumbs/<sha256>.jpg``.
"""

from __future__ import annotations

from pathlib import Path

import jinja2

from .grouping import Group

THUMB_PX = 224

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("craftflow_migrations.duplicates", "templates"),
                          autoescape=True, trim_blocks=True, lstrip_blocks=True)


def write_report(groups: list[Group], out_dir: Path, thumbnails: dict[str, bytes], threshold: int) -> Path:
    """Write ``index.html`` and ``thumbs/`` under ``out_dir``; ``thumbnails`` by sha256."""
    thumbs = out_dir / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    shown = {m.sha256 for g in groups for m in g.members if m.sha256 in thumbnails}
    for sha in shown:
        target = thumbs / f"{sha}.jpg"
        if not target.exists():  # content-addressed: an existing file is the same picture
            target.write_bytes(thumbnails[sha])
    exact = sum(g.kind == "exact" for g in groups)
    html = _ENV.get_template("index.html").render(
        groups=groups, thumbs=shown, px=THUMB_PX, threshold=threshold, exact=exact, near=len(groups) - exact,
        thumbs_total=sum(1 for g in groups for m in g.members if m.sha256 in shown),
    )
    out = out_dir / "index.html"
    out.write_text(html, encoding="utf-8")
    return out
