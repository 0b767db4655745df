"""Facts about one image file: sha256, 256-bit pHash, size and format.

The pHash is bit-identical to ``imagehash.phash(PIL.Image.open(file), hash_size=16)``: the
same greyscale 64x64 LANCZOS image from Pillow, its low frequencies by two small matrix
products instead of two full DCTs, and imagehash's own arithmetic again whenever rounding
could decide a bit (:func:`phash_hex`).

No file can stop an import, whatever its bytes:

- any exception while opening or decoding (Pillow raises ``OSError``, ``SyntaxError``,
  ``ValueError``, ``TypeError``, ``ZeroDivisionError``, ``EOFError``, ``struct.error``,
  ``MemoryError`` and more) becomes the file's recorded error;
- a file is refused *before* decoding when its header declares more pixels than
  ``NAS_MAX_PIXELS`` (default 250 M: a 40x60 inch canvas at 300 DPI is 216 M), or more pixels
  than its bytes could possibly hold (a 900-byte DDS declaring 164 M pixels);
- decoding has a wall-time cap (``NAS_DECODE_TIMEOUT``), enforced by raising an exception in
  the decoding thread from a watchdog; Pillow's decoders return to Python at least every
  64 KB of input, so the cap holds to within one chunk.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .phash_algorithm import HASH_SIZE

# Codecs whose output size is fixed by the pixel count (no entropy coding): a file must
# carry about width x height x bytes-per-pixel of data.
_UNCOMPRESSED = {"raw", "dds_rgb", "bcn", "bit", "F;16", "sgi_raw"}
# Run-length codecs cannot shrink data more than about 128:1.
_RUN_LENGTH = {"packbits", "tga_rle", "sgi_rle", "pcx", "msp"}
# Entropy-coded codecs (deflate, JPEG, LZW, WebP): deflate's ceiling is 1032:1; 5,000:1 leaves
# room for flat JPEGs while refusing headers that claim far more than the bytes could hold.
MAX_RAW_TO_FILE_RATIO = 5_000


class RefusedImage(ValueError):
    """The header is refused before decoding; the message says why."""


class DecodeTimeout(Exception):
    """Raised inside the decoding thread when a file exceeds its wall-time cap."""


@dataclass(frozen=True, slots=True)
class ImageFacts:
    sha256: str | None
    phash: str | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None = None
    thumbnail: bytes | None = None  # JPEG (or the file itself when it is already a small web image)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 250_000_000
    timeout_s: float = 120.0


# imagehash's pHash: the image in greyscale, LANCZOS to 64x64, the 16x16 lowest frequencies of
# its 2-D DCT-II (scipy.fftpack's, unnormalised: y[k] = 2 * sum x[n] cos(pi k (2n + 1) / 2N)),
# each bit "above the median". Only those 256 coefficients are needed: two products with this
# 16x64 matrix give them, where two full 64x64 DCTs and numpy.median took half the pHash of a
# small PNG (40 and 17 of 112 us).
_PHASH_SIDE = HASH_SIZE * 4
_DCT_ROWS = 2.0 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * np.arange(_PHASH_SIDE) + 1)
                         / (2 * _PHASH_SIDE))
_DCT_COLUMNS = np.ascontiguousarray(_DCT_ROWS.T)
# Both ways round differently, by at most about 1e-8 here (|coefficient| <= 4.2e6, 64 terms a
# sum, twice); a coefficient this close to the median may fall on either side of it, so such
# an image takes imagehash's own arithmetic. Flat, mirrored and striped designs do (their
# exact zeros come out as rounding noise either way); photographs and noise almost never.
PHASH_TIE_TOLERANCE = 1e-5


def phash_hex(image: Image.Image) -> str:
    """``str(imagehash.phash(image, hash_size=16))``, bit for bit, in half its time.

    The 64x64 greyscale image is Pillow's, made by the same call as imagehash's. Its low
    frequencies come from two matrix products; when every one of them stands clear of their
    median by more than both ways' rounding, the bits cannot differ from imagehash's. Otherwise
    the same pixels go through imagehash's own steps (``scipy.fftpack.dct`` twice,
    ``numpy.median``), so its rounding decides, as it does for anyone computing it by hand.
    The bits are packed with numpy: imagehash formats them through a Python string of
    '0'/'1' characters, 15% of the hashing time of a small PNG.
    """
    small = image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small)
    low = (_DCT_ROWS @ pixels.astype(np.float64) @ _DCT_COLUMNS).ravel()
    middle = np.partition(low, (low.size // 2 - 1, low.size // 2))
    median = (middle[low.size // 2 - 1] + middle[low.size // 2]) / 2
    if np.abs(low - median).min() > PHASH_TIE_TOLERANCE:
        bits = low > median
    else:
        import scipy.fftpack  # as imagehash.phash does, on the same pixels

        dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:HASH_SIZE, :HASH_SIZE]
        bits = (dct > np.median(dct)).ravel()
    return np.packbits(bits).tobytes().hex()


def _bytes_per_pixel(mode: str) -> float:
    try:
        return max(Image.getmodebands(mode), 1) * (1 if mode not in ("1",) else 1 / 8)
    except (KeyError, ValueError):
        return 1.0


def declared_size_problem(image: Image.Image, nbytes: int, limits: DecodeLimits) -> str | None:
    """Why the header's declared size is refused before decoding, or None."""
    width, height = image.size
    pixels = width * height
    if width <= 0 or height <= 0:
        return f"declares an empty image ({width}x{height})"
    if pixels > limits.max_pixels:
        return (f"declares {width}x{height} = {pixels / 1e6:,.0f} M pixels, over NAS_MAX_PIXELS "
                f"({limits.max_pixels / 1e6:,.0f} M); raise it to import this file")
    raw = pixels * _bytes_per_pixel(image.mode)
    codecs = {tile[0] for tile in (image.tile or [])}
    if codecs & _UNCOMPRESSED:
        ratio = 2.0  # a little slack for padding and headers
    elif codecs & _RUN_LENGTH:
        ratio = 130.0
    else:
        ratio = MAX_RAW_TO_FILE_RATIO
    if raw > nbytes * ratio:
        return (f"declares {width}x{height} = {pixels / 1e6:,.1f} M pixels, which {nbytes:,} bytes of "
                f"{image.format} cannot hold; refused before decoding (truncated or crafted file)")
    return None


class _Watchdog:
    """Raise :class:`DecodeTimeout` in a thread whose armed block runs past its deadline.

    ``PyThreadState_SetAsyncExc`` is how CPython delivers an exception to another thread;
    unlike ``signal.alarm`` it works outside the main thread (Celery, thread pools). One
    daemon thread per process watches every decoding thread: arming and disarming is a lock
    and a dictionary entry, a few microseconds a file (a ``threading.Timer`` per file cost
    0.4 ms, twice the hashing of a small PNG). The lock makes sure it only fires while the
    block runs, and an exception still pending when the block ends is withdrawn.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.deadlines: dict[int, float] = {}
        self.thread: threading.Thread | None = None
        self.wake_at = float("inf")  # when it looks next: a new, earlier deadline must wake it
        self.fired: set[int] = set()

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                for ident, deadline in list(self.deadlines.items()):
                    if deadline <= now:
                        del self.deadlines[ident]
                        self.fired.add(ident)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                   ctypes.py_object(DecodeTimeout))
                self.wake_at = min(self.deadlines.values(), default=float("inf"))
                self.cond.wait(None if self.wake_at == float("inf") else max(self.wake_at - now, 0.001))

    @contextmanager
    def limit(self, timeout_s: float) -> Iterator[None]:
        ident = threading.get_ident()
        with self.cond:
            if self.thread is None or not self.thread.is_alive():  # also after a fork
                self.thread = threading.Thread(target=self._run, daemon=True, name="decode-watchdog")
                self.thread.start()
            deadline = self.deadlines[ident] = time.monotonic() + timeout_s
            if deadline < self.wake_at:
                # Otherwise it sleeps until an earlier moment and looks again then: waking it
                # for every file would cost a thread switch per file.
                self.cond.notify()
        try:
            yield
        finally:
            with self.cond:
                self.deadlines.pop(ident, None)
                if ident in self.fired:
                    self.fired.discard(ident)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)


_WATCHDOG = _Watchdog()


THUMBNAIL_PX = 224
THUMBNAIL_QUALITY = 75
# A file this small, in a format every browser shows, is its own thumbnail: no encode at all.
_WEB_FORMATS = {"PNG", "JPEG", "GIF", "WEBP"}
SMALL_FILE_BYTES = 32 * 1024


# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def upright_transpose(image: Image.Image) -> Image.Transpose | None:
    """How to turn ``image`` as its EXIF orientation says (a phone photo is stored sideways).

    Only files that carry EXIF (or TIFF tags) are asked: parsing costs 3 µs a file, the info
    check 0.1. A malformed tag is no turn at all.
    """
    if image.format != "TIFF" and "exif" not in image.info and "Raw profile type exif" not in image.info:
        return None
    try:
        return _UPRIGHT.get(int(image.getexif().get(ExifTags.Base.Orientation, 1)))
    except Exception:  # noqa: BLE001 - a broken EXIF block never fails the file
        return None


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """The size ``Image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))`` gives: Pillow's own rounding."""
    if width <= THUMBNAIL_PX and height <= THUMBNAIL_PX:
        return width, height
    aspect = width / height

    def nearest(number: float, off_by: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=off_by), 1)

    if aspect <= 1:
        return nearest(THUMBNAIL_PX * aspect, lambda n: abs(aspect - n / THUMBNAIL_PX)), THUMBNAIL_PX
    return THUMBNAIL_PX, nearest(THUMBNAIL_PX / aspect, lambda n: 0 if n == 0 else abs(aspect - THUMBNAIL_PX / n))


def make_thumbnail(image: Image.Image, data: bytes) -> bytes | None:
    """A JPEG of at most THUMBNAIL_PX a side, from the image already decoded for the pHash.

    Shown upright (the EXIF orientation is applied: the JPEG carries no EXIF, and the
    duplicates check compares thumbnails as people see them; the pHash stays imagehash's, of
    the stored pixels). Transparent designs are shown on white. A thumbnail that cannot be
    made is simply absent: it never fails the file.

    Made as libvips makes one: a box reduction by the largest whole factor that keeps the
    image at least the thumbnail's size, then BICUBIC (Pillow's ``thumbnail`` default) over the
    rest, under 2x. LANCZOS all the way from a 640x480 photo cost 3.8 ms, more than its
    decoding and pHash (2.3-2.8 ms); this way 1.3.
    """
    width, height = image.size
    turn = upright_transpose(image)
    if (turn is None and image.format in _WEB_FORMATS and len(data) <= SMALL_FILE_BYTES
            and max(width, height) <= THUMBNAIL_PX):
        return data
    try:
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "1"):
            image = image.convert("RGB")
        if image.mode not in ("RGBA", "LA") and ("transparency" in image.info or image.mode == "PA"):
            image = image.convert("RGBA")
        elif image.mode == "P":
            image = image.convert("RGB")
        elif image.mode == "1":
            image = image.convert("L")
        size = thumbnail_size(width, height)
        factor = (max(1, width // size[0]), max(1, height // size[1]))
        # Pillow's reduce averages premultiplied colours for RGBA and LA: no dark fringe.
        small = image.reduce(factor) if factor != (1, 1) else image
        if small.mode in ("RGBA", "LA"):
            flat = Image.new(small.mode[:-1], small.size, "white")
            flat.paste(small, mask=small.getchannel("A"))
            small = flat
        if small.size != size:
            # The reduction rounds a partial last block up: the box keeps the picture's edges.
            small = small.resize(size, Image.Resampling.BICUBIC, box=(0, 0, width / factor[0], height / factor[1]))
        if turn is not None:
            small = small.transpose(turn)
        out = io.BytesIO()
        small.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
        return out.getvalue()
    except Exception:  # noqa: BLE001 - no thumbnail rather than a failed file
        return None


def _describe(data: bytes, limits: DecodeLimits, thumbnail: bool) -> tuple[str | None, int | None, int | None, str | None,
                                                          bytes | None]:
    with warnings.catch_warnings():
        # Pillow warns about corrupt EXIF, odd sizes and its own bomb limit; the declared size
        # is checked against our limits, and a file that fails says so in its error.
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
            problem = declared_size_problem(image, len(data), limits)
            if problem:
                raise RefusedImage(problem)
            image.load()
            return phash_hex(image), width, height, fmt, make_thumbnail(image, data) if thumbnail else None


DEFAULT_LIMITS = DecodeLimits()


def describe_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, thumbnail: bool = True) -> ImageFacts:
    """Never raises for a bad file: every failure comes back as ``error``, one readable line."""
    sha = hashlib.sha256(data).hexdigest() if data else None
    if not data:
        return ImageFacts(sha, None, None, None, None, "empty file")
    # Our limits replace Pillow's global bomb limit (179 M pixels), which would refuse a
    # 40x60 inch canvas at 300 DPI.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        try:
            with _WATCHDOG.limit(limits.timeout_s):
                phash, width, height, fmt, thumb = _describe(data, limits, thumbnail)
        except DecodeTimeout:
            raise DecodeTimeout(f"decoding took over {limits.timeout_s:g}s (NAS_DECODE_TIMEOUT); skipped") from None
        return ImageFacts(sha, phash, width, height, fmt, thumbnail=thumb)
    except UnidentifiedImageError:
        return ImageFacts(sha, None, None, None, None, "not an image (format not recognised)")
    except Image.DecompressionBombError as exc:
        return ImageFacts(sha, None, None, None, None, f"refused as a decompression bomb: {exc}")
    except (DecodeTimeout, RefusedImage) as exc:
        return ImageFacts(sha, None, None, None, None, str(exc))
    except MemoryError:
        return ImageFacts(sha, None, None, None, None, "not enough memory to decode this image")
    except RecursionError:
        return ImageFacts(sha, None, None, None, None, "unreadable image: structure nested too deeply")
    except Exception as exc:  # noqa: BLE001 - every decode failure is this file's, never the batch's
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = type(exc).__name__
        return ImageFacts(sha, None, None, None, None,
                          f"unreadable image: {detail}" if isinstance(exc, (OSError, SyntaxError, ValueError))
                          and detail else f"unreadable image ({kind}{': ' + detail if detail else ''})")
