"""Regrouping at catalogue scale: 100,000 and 1,000,000 hashes side by side, with a baseline.

The data: random 256-bit hashes in one scope (the worst case: a single tenant), with 2%
planted copies of other rows. A planted copy differs by 0-80 bits, drawn the way real
edits move a pHash: high frequencies flip more often than low ones (the weights grow
with u + v, as measured on real photographs in ``bench_duplicate_quality``).

Two methods on the same data in one run:

- ``sorted windows``: :func:`craftflow_migrations.duplicates.grouping.cluster`, the grouping
  the asset runs (candidate search, same-bytes and sure joins, union of components);
  planted copies beyond ``sure_bits`` would go to the thumbnail check, counted here;
- ``all pairs``: every pair compared in numpy blocks, the simple baseline. At 1,000,000
  it is timed on a slice of rows and scaled by the number of pairs (it would take hours).

    .venv/bin/python -m benchmarks.bench_duplicates [--sizes 100000 1000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from craftflow_migrations.duplicates.candidates import HASH_BITS, candidate_pairs
from craftflow_migrations.duplicates.grouping import Matching, cluster

_U, _V = np.divmod(np.arange(HASH_BITS), 16)
FLIP_WEIGHTS = (_U + _V + 1) / (_U + _V + 1).sum()


def corpus(n: int, max_bits: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(words (n, 4) uint64, planted (k, 2) row pairs, planted distances (k,))``."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    planted = n // 50
    copies = rng.choice(n, size=planted, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(n), copies), size=planted)
    bits = np.unpackbits(raw[sources], axis=1)
    distances = rng.integers(0, max_bits + 1, size=planted)
    # d distinct bits per copy, drawn by weight: the d largest of log(weight) + Gumbel noise.
    ranked = np.argsort(-(np.log(FLIP_WEIGHTS) + rng.gumbel(size=(planted, HASH_BITS))), axis=1)
    flip = np.arange(HASH_BITS)[None, :] < distances[:, None]
    rows = np.repeat(np.arange(planted), distances)
    bits[rows, ranked[flip]] ^= 1
    raw[copies] = np.packbits(bits, axis=1)
    words = raw.view(">u8").astype(np.uint64)
    return words, np.stack([np.minimum(sources, copies), np.maximum(sources, copies)], axis=1), distances


def all_pairs(words: np.ndarray, threshold: int, rows: slice | None = None, block: int = 256) -> np.ndarray:
    """Every pair (i < j) within ``threshold``, for the rows of ``rows`` against all."""
    rows = rows or slice(0, len(words))
    found = []
    columns = [np.ascontiguousarray(words[:, w]) for w in range(4)]
    for start in range(rows.start, rows.stop, block):
        stop = min(start + block, rows.stop)
        distances = np.zeros((stop - start, len(words)), dtype=np.uint16)
        for col in columns:
            distances += np.bitwise_count(col[start:stop, None] ^ col[None, :])
        i, j = np.nonzero(distances <= threshold)
        i = i + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-rows", type=int, default=4_000, help="rows timed for the all-pairs baseline")
    args = parser.parse_args()
    matching = Matching()
    print(f"one scope, 2% planted copies 0-{matching.candidate_bits} bits away; sure <= {matching.sure_bits} bits, "
          f"candidates <= {matching.candidate_bits}; {matching.orders} orders x window {matching.window}")
    header = f"{'hashes':>10} {'sorted windows':>15} {'all pairs':>12} {'speed-up':>9}  planted pairs found (by distance)"
    print(header)
    for n in args.sizes:
        words, planted, distances = corpus(n)
        scopes = np.zeros(n, dtype=np.int64)
        shas = np.arange(n).astype(str)
        started = time.perf_counter()
        result = cluster(words, scopes, shas, matching)
        ours = time.perf_counter() - started
        pairs, _ = candidate_pairs(words, scopes, matching.candidate_bits, matching.orders, matching.window)
        found = set(map(tuple, pairs.tolist()))
        by_band = []
        for lo, hi in ((0, matching.sure_bits), (matching.sure_bits + 1, 50), (51, 80)):
            band = (distances >= lo) & (distances <= hi)
            hit = sum(tuple(p) in found for p in planted[band].tolist())
            by_band.append(f"{lo}-{hi}: {hit / max(band.sum(), 1):.3f}")
        rows = min(args.baseline_rows, n)
        started = time.perf_counter()
        all_pairs(words, matching.candidate_bits, slice(0, rows))
        sample = time.perf_counter() - started
        # Pairs compared: rows x n for the slice, n (n - 1) / 2 in all.
        baseline = sample * (n * (n - 1) / 2) / (rows * n)
        measured = "" if rows == n else " (est.)"
        print(f"{n:>10,} {ours:>14.1f}s {baseline:>11.0f}s{measured:<6} {baseline / ours:>7.0f}x  "
              f"{', '.join(by_band)}; {result.candidate_pairs:,} candidate pairs")


if __name__ == "__main__":
    main()
