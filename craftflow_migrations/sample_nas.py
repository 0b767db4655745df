"""A small generated NAS folder for the demo: shops, templates and near-duplicate designs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

LAYOUT = {
    ("Cozy Canvas Co", "Posters 18x24"): ["sunset", "forest", "harbor", "meadow"],
    ("Cozy Canvas Co", "Canvas 16x20"): ["sunset", "city"],
    ("Étoile Prints", "Framed A3"): ["harbor", "waves", "desert"],
}


def design(name: str, size: tuple[int, int] = (1200, 900)) -> Image.Image:
    """A deterministic picture per name: gradients and shapes, like a flat-colour design."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 6.28)
        img[..., c] = 127 + 110 * np.sin(x / width * fx * 6.28 + phase) * np.cos(y / height * fy * 6.28)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.2) * width
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    return image


def near_copies(image: Image.Image) -> dict[str, Image.Image]:
    """What a shop's folder really collects: re-encodes, resizes, crops, edits, watermarks."""
    w, h = image.size
    marked = image.copy()
    ImageDraw.Draw(marked).text((w * 0.7, h * 0.9), "© CozyCanvas", fill=(255, 255, 255))
    return {
        "resized": image.resize((w // 2, h // 2), Image.LANCZOS),
        "cropped": image.crop((int(w * 0.01), int(h * 0.01), int(w * 0.99), int(h * 0.99))),
        "brighter": ImageEnhance.Brightness(image).enhance(1.15),
        "watermarked": marked,
    }


def write_sample_nas(base: Path) -> Path:
    """Create the sample folder (idempotent) and return it."""
    for (shop, template), names in LAYOUT.items():
        folder = base / shop / template
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            image = design(name)
            if not (folder / f"{name}.png").exists():
                image.save(folder / f"{name}.png")
                image.save(folder / f"{name} (web).jpg", quality=85)
            if name in ("sunset", "harbor") and not (folder / f"{name} resized.jpg").exists():
                for label, copy in near_copies(image).items():
                    copy.save(folder / f"{name} {label}.jpg", quality=90)
    broken = base / "Cozy Canvas Co" / "Posters 18x24" / "upload-interrupted.png"
    if not broken.exists():
        data = (base / "Cozy Canvas Co" / "Posters 18x24" / "sunset.png").read_bytes()
        broken.write_bytes(data[: len(data) // 3])
    return base
