"""Candidate pairs of near-identical 256-bit pHashes among a million, without all pairs.

A crop moves a pHash 30-90 bits, too far for an exact index: a Hamming ball of 80 bits
holds far too much of the space for bands or multi-index hashing to prune. Instead the
hashes are sorted, several times, by a key made of their lowest-frequency bits in a
random order, and each hash is compared with the few that sort next to it (Charikar's
sorted-permutation search). Low frequencies are what a crop, a watermark or a rotation
changes least (measured: 6-10% of those bits flip, against 15-35% of the rest), so two
copies share a long key prefix in some order and meet in a window.

The cost is fixed by ``orders x window`` comparisons per hash, whatever the data: a
thousand blank designs with one key never make a quadratic bucket. The price is that it
is probabilistic; ``benchmarks/bench_duplicates.py`` prints the share of planted pairs
it finds at 100,000 and 1,000,000 hashes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from craftflow_migrations.settings import usable_cores

HASH_BITS = 256
_MAX_THREADS = 8
_THREADS_MEMORY = 1 << 30  # bytes the orders running at once may hold together
_THREADS_FROM = 20_000  # hashes; below this an order takes under a millisecond
_SIDE = 16  # imagehash's pHash of hash_size 16: row-major 16 x 16 DCT signs, lowest first


def low_frequency_bits(count: int) -> np.ndarray:
    """Bit positions of the ``count`` lowest DCT frequencies (u + v), the DC term left out."""
    u, v = np.divmod(np.arange(HASH_BITS), _SIDE)
    order = np.lexsort((np.maximum(u, v), u + v))
    return order[1:count + 1]


# 54 positions: every u + v <= 9 but the DC term.
KEY_POOL = low_frequency_bits(54)
KEY_BITS = 44


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(axis=-1)


def candidate_pairs(words: np.ndarray, scopes: np.ndarray, max_bits: int, orders: int = 48, window: int = 8,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of one scope found within ``max_bits``: ``(pairs (k, 2), distances (k,))``.

    ``words`` is (n, 4) uint64, ``scopes`` (n,) small non-negative integers. Rows should be
    distinct: identical hashes are grouped before, by equality.
    """
    n = len(words)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.int64)
    scope_bits = max(1, int(scopes.max()).bit_length())
    key_bits = min(KEY_BITS, 64 - scope_bits)
    # The pool's bits once, one byte each and one row per bit: a key is then built a byte at a
    # time from whole rows (gathering columns of an (n, 54) array, then packing each row, was a
    # third of the duplicates step at 100,000 hashes).
    pool = np.ascontiguousarray(np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)[:, KEY_POOL].T)
    by_word = [np.ascontiguousarray(words[:, w]) for w in range(4)]
    scope_key = scopes.astype(np.uint64) << np.uint64(64 - scope_bits)
    rng = np.random.default_rng(seed)
    # Every order's bits drawn first, in one sequence: the orders then run on threads (numpy's
    # sorts and ufuncs release the GIL) and find the same pairs as one after another.
    keys = [rng.permutation(len(KEY_POOL))[:key_bits] for _ in range(orders)]

    def one_order(columns: np.ndarray) -> list[np.ndarray]:
        key = np.zeros(n, dtype=np.uint64)
        for first in range(0, key_bits, 8):  # a byte of the key from 8 rows, the first bit the highest
            byte = np.zeros(n, dtype=np.uint8)
            for k, bit in enumerate(columns[first:first + 8]):
                byte |= pool[bit] << np.uint8(7 - k)
            key |= byte.astype(np.uint64) << np.uint64(56 - first)
        key = (key >> np.uint64(scope_bits)) | scope_key
        order = np.argsort(key)
        # Neighbours in the sorted order are contiguous slices: no gather per offset.
        columns_sorted = [column[order] for column in by_word]
        sorted_scopes = scopes[order]
        out = []
        for d in range(1, min(window, n - 1) + 1):
            dist = sum(np.bitwise_count(c[:-d] ^ c[d:]).astype(np.int16) for c in columns_sorted).astype(np.int64)
            close = np.flatnonzero((dist <= max_bits) & (sorted_scopes[:-d] == sorted_scopes[d:]))
            if len(close):
                i, j = order[close], order[close + d]
                out.append(np.stack([np.minimum(i, j) * n + np.maximum(i, j), dist[close]], axis=1))
        return out

    # Each order holds up to about 128 bytes a hash while it runs (its key, order, sorted words
    # and one offset's distances): as many at once as fit in _THREADS_MEMORY.
    fit = _THREADS_MEMORY // (128 * n)
    threads = max(1, min(usable_cores(), _MAX_THREADS, orders, fit)) if n >= _THREADS_FROM else 1
    if threads == 1:
        found = [part for columns in keys for part in one_order(columns)]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="pair-search") as pool_of_threads:
            found = [part for parts in pool_of_threads.map(one_order, keys) for part in parts]
    if not found:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.int64)
    coded = np.concatenate(found)
    codes, first = np.unique(coded[:, 0], return_index=True)
    return np.stack(np.divmod(codes, n), axis=1), coded[first, 1]
