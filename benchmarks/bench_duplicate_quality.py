"""Duplicate grouping on real photographs: pair precision and recall, per edit, side by side.

Each source (a tile of a photograph that a package ships, see ``real_photos``) is saved as a
PNG with one copy per edit, hashed and thumbnailed by the import's own ``describe_image``.
Grouping runs on the five edits of the issue alone, then on every edit; on tiles (49 sources,
hard negatives), then on the eight whole photographs (bigger pictures, as catalogues hold). Each run
hides the photographs among ``--filler`` random hashes in the same scope, so the candidate
search works as it would in a crowded catalogue.

    .venv/bin/pip install -e '.[photos]'
    .venv/bin/python -m benchmarks.bench_duplicate_quality [--filler 100000]

Methods: ``pHash <= 22`` (what the import did before: no thumbnails) and ``candidates +
thumbnails`` (the pHash within 80 bits, confirmed on the stored thumbnails).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from itertools import combinations

import numpy as np

from benchmarks.real_photos import EDITS, corpus
from craftflow_migrations.duplicates.grouping import ImageRow, Matching, find_groups
from craftflow_migrations.nas.hashing import describe_image

FIVE = ["jpeg re-encode", "half size", "3% crop", "+10% brightness", "text watermark"]
T0 = datetime(2024, 1, 1)


def hashed_rows(filler: int, edits: list[str], seed: int = 0, whole: bool = False
                ) -> tuple[list[ImageRow], dict[str, bytes], dict[int, tuple[str, str]]]:
    rows, thumbs, truth = [], {}, {}
    for k, sample in enumerate(s for s in corpus(whole=whole) if s.edit == "original" or s.edit in edits):
        facts = describe_image(sample.data)
        rows.append(ImageRow(k, "tenant:1", "Shop", sample.source, f"{sample.source}/{sample.edit}.img",
                             facts.sha256, facts.phash, facts.width, facts.height, facts.format, T0))
        thumbs[facts.sha256] = facts.thumbnail
        truth[k] = (sample.source, sample.edit)
    rng = np.random.default_rng(seed)
    for k in range(len(rows), len(rows) + filler):
        phash = rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex()
        rows.append(ImageRow(k, "tenant:1", "Filler", "F", f"F/{k}.png", f"{k:064x}", phash, 100, 100, "PNG", T0))
    return rows, thumbs, truth


def thumbs_of(thumbs: dict[str, bytes]):
    return lambda shas: {s: thumbs[s] for s in shas if s in thumbs}


def scores(groups, truth: dict[int, tuple[str, str]]) -> tuple[float, float, dict[str, float]]:
    """Pair precision and recall over the photographs, and per edit the share of copies
    grouped with their original."""
    group_of = {m.id: g_index for g_index, g in enumerate(groups) for m in g.members}
    ids = list(truth)
    tp = fp = fn = 0
    for a, b in combinations(ids, 2):
        together = a in group_of and group_of.get(a) == group_of.get(b)
        same = truth[a][0] == truth[b][0]
        tp += together and same
        fp += together and not same
        fn += same and not together
    # Filler joined to a photograph is a false pair too.
    fp += sum(1 for g in groups for m in g.members if m.id not in truth
              for other in g.members if other.id in truth)
    original = {src: k for k, (src, edit) in truth.items() if edit == "original"}
    per_edit: dict[str, list[bool]] = {}
    for k, (src, edit) in truth.items():
        if edit != "original":
            per_edit.setdefault(edit, []).append(k in group_of and group_of.get(original[src]) == group_of[k])
    precision = tp / (tp + fp) if tp + fp else 1.0
    return precision, tp / (tp + fn), {e: float(np.mean(v)) for e, v in per_edit.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--filler", type=int, default=100_000, help="random hashes in the same scope")
    args = parser.parse_args()
    methods = {"pHash <= 22": None, "candidates + thumbnails": Matching()}
    runs = [("the five edits of the issue", FIVE, False), ("every edit", list(EDITS), False),
            ("whole photographs (not tiles), the five edits", FIVE, True),
            ("whole photographs (not tiles), every edit", list(EDITS), True)]
    for title, edits, whole in runs:
        started = time.perf_counter()
        rows, thumbs, truth = hashed_rows(args.filler, edits, whole=whole)
        sources = len({s for s, _ in truth.values()})
        print(f"\n{title}: {sources} sources x {len(edits)} edits + originals = {len(truth)} photographs, "
              f"among {args.filler:,} random hashes (hashed in {time.perf_counter() - started:.1f}s)")
        results = {}
        for name, matching in methods.items():
            started = time.perf_counter()
            if matching is None:
                groups = find_groups(rows, 22)
            else:
                groups = find_groups(rows, thumbnails=thumbs_of(thumbs), matching=matching)
            results[name] = (*scores(groups, truth), time.perf_counter() - started)
        width = max(len(e) for e in edits)
        print(f"  {'':{width}}  " + "  ".join(f"{n:>24}" for n in methods))
        print(f"  {'pair precision':{width}}  " + "  ".join(f"{r[0]:>24.3f}" for r in results.values()))
        print(f"  {'pair recall':{width}}  " + "  ".join(f"{r[1]:>24.3f}" for r in results.values()))
        for edit in edits:
            print(f"  {edit:{width}}  " + "  ".join(f"{r[2][edit]:>24.2f}" for r in results.values()))
        print(f"  {'seconds':{width}}  " + "  ".join(f"{r[3]:>24.1f}" for r in results.values()))


if __name__ == "__main__":
    main()
