"""Is this pair the same picture? An independent check on the stored thumbnails.

The pHash finds candidates; this decides the ones it cannot (crops, rotations, watermarks
move a pHash 30-90 bits, as far as some unrelated photographs). Both thumbnails are reduced
to a small grey image and band-passed (the image minus its blur): light, contrast and colour
drop out, and so do the smooth gradients that make any two skies or two dark micrographs
correlate. One image is then compared, at every crop window it could have been cut from
(up to ``MAX_CROP`` of each side, either axis, any side), with the whole of the other, and
the best normalised correlation is the pair's score: 1.0 is the same picture.

Measured on real photographs with eleven edits (``benchmarks/bench_duplicate_quality.py``):
copies score 0.70 and up at the 1st percentile, different photographs (tiles of the same
photograph included) at most 0.67. ``SAME_PICTURE`` sits above the highest different pair;
copies it misses are usually joined through another copy of the same design.
"""

from __future__ import annotations

import io
import multiprocessing
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from craftflow_migrations.settings import usable_cores

from .union_find import UnionFind

SAME_PICTURE = 0.72
MAX_CROP = 0.12  # of each dimension, the two sides together
_BASE = 64  # px: the thumbnail reduced to this square first (windows are fractions of it)
_SIDE = 32  # px: each window compared at this size
_INNER = 3  # px of each window's border left out (the fill of a rotation, a bleed's edge)
_SIGMA = 2.0  # px of a window: detail finer than this is kept


def _spans() -> list[tuple[float, float]]:
    """(start, stop) fractions of one axis: the whole, then each crop at each side and centred."""
    out = [(0.0, 1.0)]
    for step in (1, 2, 3):
        keep = 1.0 - MAX_CROP * step / 3
        out += [(0.0, keep), ((1.0 - keep) / 2, (1.0 + keep) / 2), (1.0 - keep, 1.0)]
    return out


def _area_matrix(start: float, stop: float) -> np.ndarray:
    """(_SIDE, _BASE) weights that average the span [start, stop) of an axis into _SIDE cells."""
    edges = np.linspace(start * _BASE, stop * _BASE, _SIDE + 1)
    pixels = np.arange(_BASE)
    overlap = np.minimum(edges[1:, None], pixels[None, :] + 1) - np.maximum(edges[:-1, None], pixels[None, :])
    weights = np.clip(overlap, 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


_SPANS = _spans()
_INNER_ROWS = slice(_INNER, _SIDE - _INNER)
# Every (y span, x span) pair is a window; window 0 (both whole) is the whole image.
WINDOWS = len(_SPANS) ** 2


@lru_cache(maxsize=1)
def _axes() -> tuple[np.ndarray, np.ndarray]:
    """(spans * inner rows, _BASE) matrices: each span's area average, and the same blurred.

    Built on first use: scipy.ndimage costs 0.1 s to import, and every process that loads the
    job's definitions (the worker, the migrations' steps) would pay it for nothing.
    """
    from scipy.ndimage import gaussian_filter1d

    area = np.stack([_area_matrix(a, b) for a, b in _SPANS])  # (spans, _SIDE, _BASE)
    # The band-pass (a window minus its Gaussian blur) is linear, so it folds into the same
    # matrices: blur(A x Bt) = (G A) x (G B)t. Only the inner rows are ever compared.
    blur = gaussian_filter1d(np.eye(_SIDE, dtype=np.float32), _SIGMA, axis=0)
    axis = area[:, _INNER_ROWS]
    blurred = np.einsum("ij,sjb->sib", blur, area)[:, _INNER_ROWS]
    return axis.reshape(-1, _BASE), blurred.reshape(-1, _BASE)


def _windows(base: np.ndarray) -> np.ndarray:
    """(WINDOWS, inner pixels): every window of ``base``, area-averaged and band-passed.

    Two matrix products give all windows at once: row spans x base x column spans.
    """
    spans, side = len(_SPANS), _SIDE - 2 * _INNER
    flat, blurred_flat = _axes()
    band = (flat @ base) @ flat.T - (blurred_flat @ base) @ blurred_flat.T  # (spans*side, spans*side)
    return band.reshape(spans, side, spans, side).transpose(0, 2, 1, 3).reshape(WINDOWS, side * side)


def _units(band: np.ndarray) -> np.ndarray:
    flat = band - band.mean(axis=1, keepdims=True)
    norms = np.sqrt((flat * flat).sum(axis=1, keepdims=True))
    return (flat / np.maximum(norms, 1e-6)).astype(np.float32)


def features(thumbnail: bytes) -> np.ndarray | None:
    """(WINDOWS, pixels) unit vectors, row 0 the whole image; None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(thumbnail)) as image:
                image.draft("L", (_BASE, _BASE))  # a JPEG decodes straight at 1/2 to 1/8 scale
                grey = image.convert("L").resize((_BASE, _BASE), Image.Resampling.BOX)
    except Exception:  # noqa: BLE001 - no thumbnail, no check: the pair is decided by pHash alone
        return None
    return _units(_windows(np.asarray(grey, dtype=np.float32)))


def score(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of either image's crop windows with the whole of the other."""
    return float(max((a @ b[0]).max(), (b @ a[0]).max()))


# Below this many pairs a process pool costs more than it saves.
PARALLEL_FROM = 2000
_CHUNK = 256
# Features an image keeps while its component is decided: 270 KB each, so at most 69 MB a process.
_FEATURES_KEPT = 256

# (label of one side, label of the other, sha256 of one, sha256 of the other)
Pair = tuple[int, int, str, str]


@dataclass
class Confirmation:
    joins: list[tuple[int, int]] = field(default_factory=list)  # (label, label) pairs the thumbnails join
    checked: int = 0  # pairs scored
    confirmed: int = 0  # of them, the same picture
    unchecked: int = 0  # left apart: a thumbnail is missing or unreadable

    def add(self, other: Confirmation) -> None:
        self.joins += other.joins
        self.checked += other.checked
        self.confirmed += other.confirmed
        self.unchecked += other.unchecked


def _confirm_component(pairs: Sequence[Pair], thumbnails: Mapping[str, bytes], same_picture: float,
                       out: Confirmation) -> None:
    """The pairs in the order given (closest first); a pair whose two sides are already joined,
    through pairs confirmed before it, is not scored at all: it could join nothing. An image's
    features are made once while its component is decided."""
    joined = UnionFind()

    @lru_cache(maxsize=_FEATURES_KEPT)
    def of(sha: str) -> np.ndarray | None:
        data = thumbnails.get(sha)
        return features(data) if data else None

    for a, b, sha_a, sha_b in pairs:
        if joined.find(a) == joined.find(b):
            continue
        fa, fb = of(sha_a), of(sha_b)
        if fa is None or fb is None:
            out.unchecked += 1
            continue
        out.checked += 1
        if score(fa, fb) >= same_picture:
            out.confirmed += 1
            joined.union(a, b)
            out.joins.append((a, b))


def _confirm_components(components: Sequence[Sequence[Pair]], thumbnails: Mapping[str, bytes],
                        same_picture: float) -> Confirmation:
    out = Confirmation()
    for pairs in components:
        _confirm_component(pairs, thumbnails, same_picture, out)
    return out


def _one_blas_thread() -> None:
    # Each worker is one core's worth: BLAS threads of its own on top would oversubscribe the
    # machine and spin (measured: 5.7x slower with two workers on two cores).
    threadpool_limits(1)


def confirm_pairs(components: Sequence[Sequence[Pair]], thumbnails: Mapping[str, bytes],
                  same_picture: float = SAME_PICTURE, workers: int | None = None) -> Confirmation:
    """Which candidate pairs the thumbnails join, component by component of the candidate graph.

    A component's pairs come closest first, and a pair already joined through others is
    skipped, so a design with many copies costs about one scored pair per copy rather than
    one per pair: 8,000 crops of eight photographs scored 25,111 pairs and made features
    25,392 times; component by component, 6,263 and about 6,400. The joins, and so the groups,
    are the same either way. Large batches are spread over a process pool (one process per
    core, up to 8), whole components to a worker: one component holding most of the pairs is
    decided on one core, where scoring every pair spread them over all (it then skips most).
    """
    workers = workers or min(usable_cores(), 8)
    total = sum(len(pairs) for pairs in components)
    # A daemonic process (a Celery prefork worker) may not have children: decide in-process.
    if workers < 2 or total < PARALLEL_FROM or multiprocessing.current_process().daemon:
        return _confirm_components(components, thumbnails, same_picture)
    # Largest components first, small ones packed together up to a chunk's worth of pairs.
    chunks: list[list[Sequence[Pair]]] = []
    size = _CHUNK
    for pairs in sorted(components, key=len, reverse=True):
        if size >= _CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(pairs)
        size += len(pairs)
    # forkserver: never fork a process whose other threads (Dagster's, the log capture) may
    # hold a lock the child would wait on forever.
    context = multiprocessing.get_context("forkserver")
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_blas_thread) as pool:
            futures = [pool.submit(_confirm_components, chunk,
                                   {s: thumbnails[s] for pairs in chunk for pair in pairs for s in pair[2:]
                                    if s in thumbnails}, same_picture) for chunk in chunks]
            out = Confirmation()
            for future in futures:
                out.add(future.result())
            return out
    except (OSError, BrokenProcessPool):
        # No pool to be had here (process limits, a sandbox): slower, same answer.
        return _confirm_components(components, thumbnails, same_picture)
