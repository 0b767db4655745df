"""Group duplicate designs: exact (same sha256) and near (pHash Hamming distance <= threshold).

Near groups without an all-pairs loop: the 256-bit hash is split into ``threshold + 1``
bands, so two hashes within the threshold agree exactly on at least one band
(pigeonhole). Only pairs sharing a band are compared, in numpy, and matches are merged
with union-find, which also joins chains (A near B, B near C). Groups do not depend on
the order rows arrive in: members are sorted and groups ordered by their first member.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

HASH_BITS = 256
# Measured on generated photographs (see README): re-encoded, resized, brightened and
# watermarked copies are 0-6 bits apart, 1% crops 14-22, unrelated designs 114 or more.
DEFAULT_THRESHOLD = 22
LOSSLESS = {"PNG", "TIFF", "BMP", "GIF", "PPM", "TGA"}


@dataclass(frozen=True)
class ImageRow:
    id: int
    scope: str
    shop: str
    template: str
    path: str
    sha256: str
    phash: str
    width: int
    height: int
    format: str
    mtime: datetime

    @property
    def sort_key(self) -> tuple:
        return (self.shop, self.template, self.path, self.id)


@dataclass
class Group:
    kind: str  # exact | near
    scope: str
    members: list[ImageRow]
    keep: ImageRow
    keep_reason: str
    distances: dict[int, int] = field(default_factory=dict)  # image id -> distance to keep

    @property
    def max_distance(self) -> int:
        return max(self.distances.values(), default=0)


def hash_words(hashes: Sequence[str]) -> np.ndarray:
    """(n, 4) uint64 from 64-hex-digit hashes."""
    raw = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u8").reshape(len(hashes), 4)
    return raw.astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b).sum(axis=-1)


def _bands(words: np.ndarray, count: int) -> list[np.ndarray]:
    """Split each 256-bit hash into ``count`` bands of near-equal width, as integers."""
    bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)  # (n, 256)
    edges = np.linspace(0, HASH_BITS, count + 1).astype(int)
    out = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        width = stop - start
        weights = (1 << np.arange(width - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
        out.append((bits[:, start:stop].astype(np.uint64) * weights).sum(axis=1))
    return out


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(words: np.ndarray, threshold: int) -> np.ndarray:
    """Every pair (i < j) within ``threshold`` bits: shape (k, 2)."""
    n = len(words)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    found = []
    for band in _bands(words, threshold + 1):
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        # Compare each row with the next d rows of the same bucket, for every d up to the
        # largest bucket: numpy over all rows at once, never a loop over pairs.
        bucket_sizes = np.unique(sorted_band, return_counts=True)[1]
        for d in range(1, int(bucket_sizes.max())):
            same = sorted_band[:-d] == sorted_band[d:]
            if not same.any():
                break
            i, j = order[:-d][same], order[d:][same]
            close = hamming(words[i], words[j]) <= threshold
            if close.any():
                found.append(np.stack([np.minimum(i, j)[close], np.maximum(i, j)[close]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def resolution(row: ImageRow) -> int:
    return (row.width or 0) * (row.height or 0)


def choose_keep(members: Sequence[ImageRow]) -> tuple[ImageRow, str]:
    """Highest resolution, then lossless over lossy, then oldest; the path breaks ties."""
    def rank(r: ImageRow) -> tuple:
        return (-resolution(r), 0 if (r.format or "").upper() in LOSSLESS else 1, r.mtime, r.sort_key)

    ordered = sorted(members, key=rank)
    keep, runner_up = ordered[0], ordered[1]
    if resolution(keep) > resolution(runner_up):
        reason = f"highest resolution ({keep.width}×{keep.height})"
    elif rank(keep)[1] < rank(runner_up)[1]:
        reason = f"same resolution, lossless {keep.format} over lossy {runner_up.format}"
    elif keep.mtime < runner_up.mtime:
        reason = f"same resolution and kind of format; oldest ({keep.mtime:%Y-%m-%d %H:%M})"
    else:
        reason = "identical in resolution, format and age; first by path"
    return keep, reason


def _make_group(kind: str, members: list[ImageRow], words: dict[int, np.ndarray]) -> Group:
    members = sorted(members, key=lambda r: r.sort_key)
    keep, reason = choose_keep(members)
    distances = {m.id: int(hamming(words[m.id], words[keep.id])) for m in members}
    return Group(kind, members[0].scope, members, keep, reason, distances)


def find_groups(rows: Iterable[ImageRow], threshold: int = DEFAULT_THRESHOLD) -> list[Group]:
    """One group per design, per scope: byte-identical copies and near copies together.

    A group is ``exact`` when all its members are the same bytes, ``near`` otherwise; a near
    group shows the design's exact copies inside it, never as a second group of their own.
    """
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"threshold {threshold} must be between 0 and {HASH_BITS - 1} bits")
    by_scope: dict[str, list[ImageRow]] = defaultdict(list)
    for r in rows:
        by_scope[r.scope].append(r)
    groups: list[Group] = []
    for scope in sorted(by_scope):
        scoped = sorted(by_scope[scope], key=lambda r: r.sort_key)
        words = hash_words([r.phash for r in scoped])
        word_of = {r.id: words[i] for i, r in enumerate(scoped)}
        uf = UnionFind(len(scoped))
        first_with_sha: dict[str, int] = {}
        for i, r in enumerate(scoped):
            uf.union(first_with_sha.setdefault(r.sha256, i), i)
        for i, j in near_pairs(words, threshold):
            uf.union(int(i), int(j))
        clusters: dict[int, list[ImageRow]] = defaultdict(list)
        for i, r in enumerate(scoped):
            clusters[uf.find(i)].append(r)
        for members in clusters.values():
            if len(members) > 1:
                kind = "exact" if len({m.sha256 for m in members}) == 1 else "near"
                groups.append(_make_group(kind, members, word_of))
    return sorted(groups, key=lambda g: (g.scope, g.kind, g.members[0].sort_key))
