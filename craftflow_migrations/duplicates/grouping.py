"""Group duplicate designs: one group per design, per scope (tenant).

Three kinds of evidence join two files, strongest first:

1. the same bytes (sha256) or the same pHash: joined outright;
2. pHashes within ``sure_bits`` (22 of 256): re-encodes, resizes, light edits; joined;
3. pHashes within ``candidate_bits`` (80): crops, rotations, watermarks, but also the
   closest unrelated photographs. These are decided on the stored thumbnails by an
   independent, crop-tolerant comparison (:mod:`.similarity`); a pair without both
   thumbnails is left apart.

Joins are transitive (a crop of a re-encode of the original is one design). Candidates
come from :mod:`.candidates`, so the cost grows with the number of hashes, not its square.
Groups do not depend on the order rows arrive in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import numpy as np

from ..long_lived import long_lived
from . import similarity
from .candidates import HASH_BITS, candidate_pairs, hamming
from .union_find import UnionFind

# Measured on generated and real photographs (benchmarks/bench_duplicate_quality.py):
# re-encoded, resized, brightened copies are 0-18 bits apart; unrelated photographs 56 or more.
DEFAULT_THRESHOLD = 22
# 3-8% crops, 2° rotations and watermarks are up to 110 bits away; 80 finds them through
# the chain of a design's copies, while random hashes are almost never that close.
CANDIDATE_BITS = 80
LOSSLESS = {"PNG", "TIFF", "BMP", "GIF", "PPM", "TGA"}

# sha256s -> their stored thumbnails (missing ones left out).
ThumbnailSource = Callable[[Sequence[str]], Mapping[str, bytes]]


@dataclass(frozen=True)
class Matching:
    sure_bits: int = DEFAULT_THRESHOLD
    candidate_bits: int = CANDIDATE_BITS
    same_picture: float = similarity.SAME_PICTURE
    orders: int = 48
    window: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.sure_bits <= self.candidate_bits < HASH_BITS:
            raise ValueError(f"need 0 <= sure_bits ({self.sure_bits}) <= candidate_bits ({self.candidate_bits}) "
                             f"< {HASH_BITS}")


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
    size_bytes: int = 0

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
    distances: dict[int, int] = field(default_factory=dict)  # image id -> pHash distance to keep
    id: int | None = None  # once stored

    @property
    def max_distance(self) -> int:
        return max(self.distances.values(), default=0)


@dataclass
class Clustering:
    labels: np.ndarray  # a component number per row
    candidate_pairs: int = 0
    checked_pairs: int = 0  # decided on thumbnails
    confirmed_pairs: int = 0
    unchecked_pairs: int = 0  # in the candidate band, but a thumbnail is missing


def hash_words(hashes: Sequence[str]) -> np.ndarray:
    """(n, 4) uint64 from 64-hex-digit hashes."""
    raw = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=">u8").reshape(len(hashes), 4)
    return raw.astype(np.uint64)


def _row_codes(columns: np.ndarray) -> np.ndarray:
    """The same small integer for equal rows of a (n, k) integer array."""
    order = np.lexsort(columns.T[::-1])
    ordered = columns[order]
    new = np.ones(len(columns), dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    codes = np.empty(len(columns), dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    return codes


def _value_codes(values: Sequence[str]) -> np.ndarray:
    seen: dict[str, int] = {}
    return np.fromiter((seen.setdefault(v, len(seen)) for v in values), dtype=np.int64, count=len(values))


@lru_cache(maxsize=1)
def load_sparse():
    """scipy.sparse, imported on first use: it costs 0.2 s, and the worker and every step load
    this module with the job's definitions without grouping anything. Kept for the process,
    so imported once, under ``long_lived``."""
    with long_lived():
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    return coo_matrix, connected_components


def cluster(words: np.ndarray, scopes: np.ndarray, shas: Sequence[str], matching: Matching | None = None,
            thumbnails: ThumbnailSource | None = None) -> Clustering:
    """Component labels for rows: ``words`` (n, 4) uint64 pHashes, ``scopes`` (n,) ints, ``shas``."""
    matching = matching or Matching()
    n = len(words)
    if n == 0:
        return Clustering(np.empty(0, dtype=np.int64))
    sha_codes = _value_codes(shas)
    # Rows with the same pHash in a scope are one point for the search below.
    point_of = _row_codes(np.column_stack([scopes.astype(np.uint64), words]))
    points = np.zeros(point_of.max() + 1, dtype=np.int64)
    points[point_of] = np.arange(n)  # one row standing for each point
    pairs, dist = candidate_pairs(words[points], scopes[points], matching.candidate_bits, matching.orders,
                                  matching.window)
    pairs = points[pairs] if len(pairs) else pairs
    sure = dist <= matching.sure_bits
    # Same bytes (only within a scope), same pHash, and sure pairs, all at once.
    sha_in_scope = _row_codes(np.column_stack([scopes, sha_codes]))
    edges = [np.stack([np.arange(n), n + sha_in_scope], axis=1),
             np.stack([np.arange(n), 2 * n + point_of], axis=1),
             pairs[sure]]
    joined = np.concatenate(edges)
    size = 3 * n
    coo_matrix, connected_components = load_sparse()
    graph = coo_matrix((np.ones(len(joined), dtype=np.int8), (joined[:, 0], joined[:, 1])), shape=(size, size))
    labels = connected_components(graph, directed=False)[1][:n]
    result = Clustering(labels, candidate_pairs=len(pairs))
    band = pairs[~sure][np.argsort(dist[~sure], kind="stable")]  # closest first: most likely to join
    if len(band) and thumbnails is not None:
        _confirm(band, labels, shas, matching, thumbnails, result)
    else:
        result.unchecked_pairs = int(np.count_nonzero(labels[band[:, 0]] != labels[band[:, 1]])) if len(band) else 0
    result.labels = np.unique(result.labels, return_inverse=True)[1]
    return result


def _confirm(band: np.ndarray, labels: np.ndarray, shas: Sequence[str], matching: Matching,
             thumbnails: ThumbnailSource, result: Clustering) -> None:
    """Join the pairs of the candidate band (closest first) that the thumbnails confirm.

    Joins are transitive and commute, so the pairs are decided component by component of the
    graph they draw between the groups so far, and one already joined through others is never
    scored (:func:`similarity.confirm_pairs`): the components come out the same as scoring
    every pair would make them.
    """
    todo = band[labels[band[:, 0]] != labels[band[:, 1]]]
    if not len(todo):
        return
    left, right = labels[todo[:, 0]], labels[todo[:, 1]]
    count = int(labels.max()) + 1
    coo_matrix, connected_components = load_sparse()
    graph = coo_matrix((np.ones(len(todo), dtype=np.int8), (left, right)), shape=(count, count))
    part = connected_components(graph, directed=False)[1][left]
    order = np.argsort(part, kind="stable")  # each component's pairs still closest first
    bounds = np.flatnonzero(np.diff(part[order])) + 1
    components = [[(int(labels[i]), int(labels[j]), shas[i], shas[j]) for i, j in todo[chunk].tolist()]
                  for chunk in np.split(order, bounds)]
    needed = sorted({shas[i] for i in np.unique(todo)})
    stored: dict[str, bytes] = {}
    for start in range(0, len(needed), 2000):
        stored.update(thumbnails(needed[start:start + 2000]))
    outcome = similarity.confirm_pairs(components, stored, matching.same_picture)
    result.checked_pairs += outcome.checked
    result.confirmed_pairs += outcome.confirmed
    result.unchecked_pairs += outcome.unchecked
    joined = UnionFind()
    for a, b in outcome.joins:
        joined.union(a, b)
    root = np.arange(count)
    for label in list(joined.parent):
        root[label] = joined.find(label)
    result.labels = root[labels]


def members_of(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices of every component with two rows or more."""
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.diff(labels[order], prepend=-1))
    return [part for part in np.split(order, starts[1:]) if len(part) > 1]


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


def make_group(members: Sequence[ImageRow]) -> Group:
    """A group of one design: ``exact`` when every member is the same bytes."""
    members = sorted(members, key=lambda r: r.sort_key)
    keep, reason = choose_keep(members)
    kind = "exact" if len({m.sha256 for m in members}) == 1 else "near"
    keep_words = hash_words([keep.phash])[0]
    distances = hamming(hash_words([m.phash for m in members]), keep_words)
    return Group(kind, members[0].scope, members, keep, reason,
                 {m.id: int(d) for m, d in zip(members, distances, strict=True)})


def find_groups(rows: Iterable[ImageRow], threshold: int = DEFAULT_THRESHOLD,
                thumbnails: ThumbnailSource | None = None, matching: Matching | None = None) -> list[Group]:
    """One group per design, per scope: byte-identical copies and near copies together.

    A near group shows the design's exact copies inside it, never as a second group.
    Without ``thumbnails`` only pHashes within ``threshold`` join.
    """
    matching = matching or Matching(sure_bits=threshold, candidate_bits=max(threshold, CANDIDATE_BITS))
    rows = sorted(rows, key=lambda r: (r.scope, r.sort_key))
    if not rows:
        return []
    scope_names = sorted({r.scope for r in rows})
    scope_code = {s: i for i, s in enumerate(scope_names)}
    result = cluster(hash_words([r.phash for r in rows]), np.array([scope_code[r.scope] for r in rows]),
                     [r.sha256 for r in rows], matching, thumbnails)
    groups = [make_group([rows[i] for i in part]) for part in members_of(result.labels)]
    return sorted(groups, key=lambda g: (g.scope, g.kind, g.members[0].sort_key))
