"""A static HTML page of duplicate groups: thumbnails side by side, distances and paths."""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .grouping import Group

THUMB_PX = 220

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Duplicate designs</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2rem; color: #222; }}
h1 {{ font-size: 1.4rem; }} .summary {{ color: #555; margin-bottom: 1.5rem; }}
section {{ border: 1px solid #ddd; border-radius: 8px; padding: 1rem; margin-bottom: 1.2rem; }}
section h2 {{ font-size: 1rem; margin: 0 0 .6rem; }}
.members {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
figure {{ margin: 0; width: {px}px; }} figure img {{ max-width: {px}px; max-height: {px}px; display: block;
  border: 3px solid transparent; }}
figure.keep img {{ border-color: #2a9d4b; }} figcaption {{ font-size: 12px; word-break: break-all; }}
.keep-label {{ color: #2a9d4b; font-weight: 600; }} .missing {{ width: {px}px; height: 120px; background: #eee; }}
</style></head>
<body data-thumbs-total="{total}">
<h1>Duplicate designs</h1>
<p class="summary">{summary}</p>
{sections}
<script>
// Lets a person (and the test) see that every thumbnail really loaded.
window.addEventListener("load", () => {{
  const imgs = [...document.querySelectorAll("figure img")];
  document.body.dataset.thumbsLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def _thumbnail(data: bytes, target: Path) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            image.convert("RGB").save(target, "JPEG", quality=80)
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means no preview, never a failed report
        return False


def write_report(groups: list[Group], out_dir: Path, read: Callable[[str], bytes], threshold: int) -> Path:
    """Write ``index.html`` and ``thumbs/`` under ``out_dir``; ``read`` fetches a file by NAS path."""
    thumbs = out_dir / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    sections = []
    total = 0
    for number, g in enumerate(groups, 1):
        figures = []
        for m in g.members:
            name = f"{m.id}.jpg"
            ok = (thumbs / name).exists()
            if not ok:
                try:
                    ok = _thumbnail(read(m.path.encode()), thumbs / name)
                except Exception:  # noqa: BLE001 - a picture that cannot be read shows as missing
                    ok = False
            total += ok
            picture = (f'<img src="thumbs/{name}" alt="{html.escape(m.path)}" loading="eager">' if ok
                       else '<div class="missing">no preview</div>')
            keep = ' class="keep"' if m.id == g.keep.id else ""
            label = '<span class="keep-label">KEEP</span> ' if m.id == g.keep.id else ""
            figures.append(
                f"<figure{keep}>{picture}<figcaption>{label}{html.escape(m.shop)} / {html.escape(m.template)}<br>"
                f"{html.escape(m.path.split('/')[-1])}<br>{m.width}×{m.height} {html.escape(m.format or '')}, "
                f"distance {g.distances[m.id]}</figcaption></figure>"
            )
        sections.append(
            f'<section class="group {g.kind}"><h2>Group {number}: {g.kind}, {len(g.members)} files, '
            f"scope {html.escape(g.scope)}, max distance {g.max_distance} bits. Keep: "
            f"{html.escape(g.keep.path)} ({html.escape(g.keep_reason)})</h2>"
            f'<div class="members">{"".join(figures)}</div></section>'
        )
    exact = sum(g.kind == "exact" for g in groups)
    summary = (f"{exact} exact and {len(groups) - exact} near-duplicate groups "
               f"(pHash within {threshold} of 256 bits); the copy to keep is framed in green.")
    out = out_dir / "index.html"
    out.write_text(PAGE.format(px=THUMB_PX, total=total, summary=summary,
                               sections="\n".join(sections) or "<p>No duplicates.</p>"))
    return out
