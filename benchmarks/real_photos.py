"""Real photographs that installed packages ship, and the edits a print shop makes to them.

Sources (the ``photos`` extra installs them): scikit-learn's sample images, matplotlib's
sample data, PyWavelets' test images and mahotas' demo pictures. scikit-image's photos are
deliberately absent (they are held out to check this work), and so is every copy of them
another package ships (PyWavelets' ``camera`` is scikit-image's cameraman).

Each photograph is cut into non-overlapping tiles of at least ``TILE_PX`` a side, and each
tile is one source design. Tiles of one photograph share its light, colours and texture,
so they are the hardest negatives a catalogue holds (twenty tiles of the same micrograph
of cell nuclei); two tiles must never be grouped.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

TILE_PX = 240

# (package, resource path): never scikit-image's photographs or copies of them.
PHOTOS = [
    ("sklearn.datasets", "images/china.jpg"),
    ("sklearn.datasets", "images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("pywt", "data/aero.npz"),
    ("pywt", "data/ascent.npz"),
    ("mahotas", "demos/data/DepartmentStore.jpg"),
    ("mahotas", "demos/data/luispedro.jpg"),
    ("mahotas", "demos/data/nuclear.png"),
]


def _open(package: str, path: str) -> Image.Image:
    resource = resources.files(package).joinpath(path)
    if path.endswith(".npz"):
        with resource.open("rb") as fh:
            return Image.fromarray(np.load(fh)["data"]).convert("RGB")
    with resource.open("rb") as fh:
        return Image.open(io.BytesIO(fh.read())).convert("RGB")


def photographs() -> Iterator[tuple[str, Image.Image]]:
    for package, path in PHOTOS:
        yield path.rsplit("/", 1)[-1].split(".")[0], _open(package, path)


def sources() -> list[tuple[str, Image.Image]]:
    """Every tile of every photograph, named ``photo-row-col``."""
    out = []
    for name, photo in photographs():
        width, height = photo.size
        cols, rows = max(1, width // TILE_PX), max(1, height // TILE_PX)
        tw, th = width // cols, height // rows
        for r in range(rows):
            for c in range(cols):
                out.append((f"{name}-{r}-{c}", photo.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th))))
    return out


def _crop(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    """Remove ``fraction`` of each dimension, split at random between the two sides (a bleed)."""
    width, height = image.size
    dx, dy = round(width * fraction), round(height * fraction)
    left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return image.crop((left, top, width - (dx - left), height - (dy - top)))


def _watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = image.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    size = max(10, out.height // 18)
    font = ImageFont.load_default(size=size)
    text = "© CraftFlow shop"
    box = ImageDraw.Draw(layer).textbbox((0, 0), text, font=font)
    x = out.width - (box[2] - box[0]) - size // 2
    y = out.height - (box[3] - box[1]) - size
    ImageDraw.Draw(layer).text((x, y), text, font=font, fill=(255, 255, 255, 170))
    return Image.alpha_composite(out, layer).convert("RGB")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


Edit = Callable[[Image.Image, np.random.Generator], bytes]

# The five edits of the issue, then harder ones.
EDITS: dict[str, Edit] = {
    "jpeg re-encode": lambda im, rng: _jpeg(im, 75),
    "half size": lambda im, rng: _png(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)),
    "3% crop": lambda im, rng: _png(_crop(im, 0.03, rng)),
    "+10% brightness": lambda im, rng: _png(ImageEnhance.Brightness(im).enhance(1.10)),
    "text watermark": lambda im, rng: _png(_watermark(im, rng)),
    "5% crop": lambda im, rng: _png(_crop(im, 0.05, rng)),
    "jpeg 90%": lambda im, rng: _jpeg(im, 90),
    "grayscale": lambda im, rng: _png(im.convert("L")),
    "2° rotation": lambda im, rng: _png(im.rotate(2, Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))),
    "3% crop, then jpeg": lambda im, rng: _jpeg(_crop(im, 0.03, rng), 80),
    "8% crop": lambda im, rng: _png(_crop(im, 0.08, rng)),
}


@dataclass(frozen=True)
class Sample:
    source: str
    edit: str  # "original" for the source itself
    data: bytes


def corpus(edits: dict[str, Edit] = EDITS, seed: int = 0, whole: bool = False) -> list[Sample]:
    """Each source as a PNG, and one file per edit of it (sources: tiles, or whole photographs)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, image in (list(photographs()) if whole else sources()):
        out.append(Sample(name, "original", _png(image)))
        for edit, make in edits.items():
            out.append(Sample(name, edit, make(image, rng)))
    return out
