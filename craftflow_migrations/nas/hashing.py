"""Facts about one image file: sha256, 256-bit pHash, size and format.

The pHash is ``imagehash.phash(PIL.Image.open(file), hash_size=16)`` itself, called
on the same bytes, so it is bit-identical to what anyone computing it by hand gets.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import imagehash
from PIL import Image, UnidentifiedImageError

HASH_SIZE = 16
PHASH_ALGORITHM = f"imagehash-{imagehash.__version__}:phash:hash_size={HASH_SIZE}"


@dataclass(frozen=True)
class ImageFacts:
    sha256: str | None
    phash: str | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def phash_hex(image: Image.Image) -> str:
    return str(imagehash.phash(image, hash_size=HASH_SIZE))


def describe_image(data: bytes) -> ImageFacts:
    """Never raises for a bad file: empty, truncated and non-image files come back with ``error``."""
    sha = hashlib.sha256(data).hexdigest() if data else None
    if not data:
        return ImageFacts(sha, None, None, None, None, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
            image.load()
            return ImageFacts(sha, phash_hex(image), width, height, fmt)
    except UnidentifiedImageError:
        return ImageFacts(sha, None, None, None, None, "not an image (format not recognised)")
    except Image.DecompressionBombError as exc:
        return ImageFacts(sha, None, None, None, None, f"refused as a decompression bomb: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt files as OSError or SyntaxError.
        return ImageFacts(sha, None, None, None, None, f"unreadable image: {exc}")
