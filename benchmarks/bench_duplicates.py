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

The ``--asset`` part runs the whole ``design_duplicates`` asset (``full: true``) on a scratch
database holding the same hashes: COPY them out of PostgreSQL, group, check the band's
planted pairs on real thumbnails (real photographs and their edits, so the checks cost
what they cost), write the groups and the report.

    .venv/bin/python -m benchmarks.bench_duplicates [--sizes 100000 1000000] [--asset]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from itertools import cycle
from pathlib import Path

import numpy as np

from craftflow_migrations.duplicates.candidates import HASH_BITS, candidate_pairs, hamming
from craftflow_migrations.duplicates.grouping import Matching, cluster, hash_words

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


def _copy(conn, table: str, columns: str, rows) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(row) + "\n")
    buffer.seek(0)
    conn.connection.dbapi_connection.cursor().copy_expert(f"COPY {table} ({columns}) FROM STDIN", buffer)


def photo_thumbnail_pairs() -> list[tuple[bytes, bytes]]:
    """(original, edit) thumbnails of real photographs whose pHashes are over 22 bits apart."""
    from benchmarks.real_photos import corpus as photo_corpus
    from craftflow_migrations.nas.hashing import describe_image

    facts = {}
    for sample in photo_corpus():
        facts[(sample.source, sample.edit)] = describe_image(sample.data)
    pairs = []
    for (source, edit), f in facts.items():
        original = facts[(source, "original")]
        if edit != "original" and int(hamming(hash_words([f.phash]), hash_words([original.phash]))[0]) > 22:
            pairs.append((original.thumbnail, f.thumbnail))
    return pairs


def asset_regroup(server, n: int, thumbs: list[tuple[bytes, bytes]]) -> dict:
    """Load ``n`` hashes into a scratch database and time the design_duplicates asset on them."""
    import dagster as dg
    from sqlalchemy import text

    from craftflow_migrations.db import get_engine
    from craftflow_migrations.duplicates.assets import design_duplicates
    from craftflow_migrations.migrations import __path__ as migrations_path
    from craftflow_migrations.nas.phash_algorithm import PHASH_ALGORITHM
    from craftflow_migrations.resources import PostgresResource
    from craftflow_migrations.schema.discovery import discover
    from craftflow_migrations.schema.runner import run_pending
    from craftflow_migrations.settings import MigrationSettings

    url = server.create_database("cfm_bench_dups")
    try:
        engine = get_engine(url)
        assert not run_pending(engine, discover(Path(migrations_path[0])), "startup", MigrationSettings()).failed
        words, planted, distances = corpus(n)
        hexes = [row.tobytes().hex() for row in words.astype(">u8")]
        shas = [f"{i:064x}" for i in range(n)]
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants (id, name, slug) VALUES (1, 'Bench', 'bench')"))
            conn.execute(text("INSERT INTO shops (id, tenant_id, name, platform) VALUES (1, 1, 'Bench Shop', 'etsy')"))
            _copy(conn, "design_images",
                  "id, shop, template, path, shop_id, size_bytes, mtime, sha256, phash, hash_algorithm, width, height, "
                  "format, status",
                  ((str(i + 1), "Bench Shop", f"T{i % 1000}", f"Bench Shop/T{i % 1000}/{i}.png", "1",
                    str(200_000 + i % 5000), "2024-01-01 00:00:00+00", shas[i], hexes[i], PHASH_ALGORITHM, "1200",
                    "900", "PNG", "ok") for i in range(n)))
            band = planted[distances > 22]
            pairs = cycle(thumbs)
            rows = []
            for (a, b), (ta, tb) in zip(band.tolist(), pairs, strict=False):
                rows += [(shas[a], ta), (shas[b], tb)]
            _copy(conn, "design_thumbnails", "sha256, jpeg",
                  ((sha, "\\\\x" + data.hex()) for sha, data in dict(rows).items()))
            conn.execute(text("ANALYZE design_images"))
        with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
            started = time.perf_counter()
            result = dg.materialize(
                [design_duplicates], instance=instance, resources={"postgres": PostgresResource(database_url=url)},
                run_config={"ops": {"design_duplicates": {"config": {"full": True, "report_dir": tmp}}}})
            wall = time.perf_counter() - started
        meta = {k: v.value for k, v in result.asset_materializations_for_node("design_duplicates")[0].metadata.items()}
        return {"wall": wall, "band": len(band), **meta}
    finally:
        server.drop_database(url)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-rows", type=int, default=4_000, help="rows timed for the all-pairs baseline")
    parser.add_argument("--asset", action="store_true", help="also time the whole asset on a scratch database")
    parser.add_argument("--asset-only", action="store_true", help="only the whole asset")
    args = parser.parse_args()
    matching = Matching()
    print(f"one scope, 2% planted copies 0-{matching.candidate_bits} bits away; sure <= {matching.sure_bits} bits, "
          f"candidates <= {matching.candidate_bits}; {matching.orders} orders x window {matching.window}")
    header = f"{'hashes':>10} {'sorted windows':>15} {'all pairs':>12} {'speed-up':>9}  planted pairs found (by distance)"
    print(header)
    for n in args.sizes if not args.asset_only else ():
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
    if not (args.asset or args.asset_only):
        return
    from craftflow_migrations_tests.support import PostgresServer

    server = PostgresServer()
    thumbs = photo_thumbnail_pairs()
    print("\nthe design_duplicates asset, full regroup (PostgreSQL on the same cores)")
    print(f"{'hashes':>10} {'whole asset':>12} {'COPY out':>9} {'grouping':>9} {'writing':>8} {'report':>7}  "
          f"thumbnail checks")
    try:
        for n in args.sizes:
            r = asset_regroup(server, n, thumbs)
            print(f"{n:>10,} {r['wall']:>11.1f}s {r['loading_seconds']:>8.1f}s {r['grouping_seconds']:>8.1f}s "
                  f"{r['writing_seconds']:>7.1f}s {r['report_seconds']:>6.1f}s  {r['pairs_checked_on_thumbnails']:,} pairs ({r['band']:,} planted beyond "
                  f"{matching.sure_bits} bits); {r['near_groups']:,} near groups")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

