"""Hashes are imagehash's own, and bad files are described, never raised."""

import io

import imagehash
import numpy as np
from PIL import Image, ImageDraw

from craftflow_migrations.nas.batching import MB, plan_batches
from craftflow_migrations.nas.hashing import describe_image
from craftflow_migrations.nas.listing import NasFile

from .support import noise_image, photo_like, write_bad_files


def test_phash_is_bit_identical_to_imagehash(tmp_path):
    cases = {
        "rgba.png": noise_image(900, 700, 1, "RGBA"),
        "rgb.png": photo_like(800, 600, 2),
        "photo.jpg": photo_like(1024, 768, 3),
        "gray.png": photo_like(300, 300, 4).convert("L"),
        "palette.gif": photo_like(200, 150, 5).convert("P"),
    }
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path)
        facts = describe_image(path.read_bytes())
        assert facts.ok, (name, facts.error)
        assert facts.phash == str(imagehash.phash(Image.open(path), hash_size=16)), name
        assert len(facts.phash) == 64
        assert (facts.width, facts.height) == image.size


def _designs_of_every_kind(count: int) -> list[tuple[str, Image.Image]]:
    """Noise and photographs, and the designs whose DCT has exact zeros (rounding decides there)."""
    rng = np.random.default_rng(11)
    out = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        half = rng.integers(0, 256, (h, max(w // 2, 1)), dtype=np.uint8)
        y, x = np.mgrid[0:h, 0:w]
        badge = Image.new("RGBA", (w, h), (255, 255, 255, 0))
        ImageDraw.Draw(badge).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(200, 10, 10, 255))
        stripes = np.zeros((h, w), np.uint8)
        stripes[:, :: 1 + i % 3] = 255
        out += [
            ("noise", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))),
            ("flat", Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))),
            ("mirrored", Image.fromarray(np.hstack([half, half[:, ::-1]]))),
            ("centred badge", badge),
            ("stripes", Image.fromarray(stripes)),
            ("gradient", Image.fromarray(np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8))),
            ("waves", Image.fromarray(((np.sin(x / (1 + i % 17)) + np.cos(y / 7)) * 60 + 128).astype(np.uint8))),
            ("float", Image.fromarray((rng.random((h, w)) * 1e3).astype(np.float32), "F")),
            ("palette", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")),
        ]
    return out + [("photo-like", photo_like(int(rng.integers(100, 900)), int(rng.integers(100, 900)), i))
                  for i in range(20)]


def test_the_fast_phash_matches_imagehash_bit_for_bit_on_every_kind_of_design():
    """Two matrix products where rounding cannot decide a bit; imagehash's own arithmetic where it can."""
    from craftflow_migrations.nas import hashing

    taken = {"matrix products": set(), "imagehash's arithmetic": set()}
    for kind, image in _designs_of_every_kind(60):
        assert hashing.phash_hex(image) == str(imagehash.phash(image, hash_size=16)), (kind, image.size, image.mode)
        pixels = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64)
        low = (hashing._DCT_ROWS @ pixels @ hashing._DCT_COLUMNS).ravel()
        tie = np.abs(low - np.median(low)).min() <= hashing.PHASH_TIE_TOLERANCE
        taken["imagehash's arithmetic" if tie else "matrix products"].add(kind)
    # Both ways are proven: photographs and noise by the products, degenerate designs by imagehash.
    assert {"noise", "photo-like", "waves"} <= taken["matrix products"]
    assert {"flat", "mirrored", "stripes", "gradient"} <= taken["imagehash's arithmetic"]


def test_bad_files_are_described(tmp_path):
    bad = write_bad_files(tmp_path)
    assert describe_image(b"").error == "empty file"
    assert describe_image(bad["text"].read_bytes()).error == "not an image (format not recognised)"
    truncated = describe_image(bad["truncated"].read_bytes())
    assert truncated.error.startswith("unreadable image:") and truncated.sha256


def files(sizes_mb):
    return [NasFile("s", "t", f"s/t/{i}", int(mb * MB), 0) for i, mb in enumerate(sizes_mb)]


def test_batches_are_about_the_target_and_balanced():
    batches = plan_batches(files([50] * 12), target_bytes=500 * MB, workers=2)
    assert [len(b) for b in batches] == [6, 6]
    big = plan_batches(files([100] * 30), target_bytes=500 * MB, workers=2)
    assert len(big) == 6 and all(sum(f.size for f in b) == 500 * MB for b in big)
    assert plan_batches(files([1] * 10), target_bytes=500 * MB, workers=4) == [files([1] * 10)]  # too small to split
    assert plan_batches([], 500 * MB) == []
    assert sum(len(b) for b in plan_batches(files([700, 10, 10]), 500 * MB, 2)) == 3


def test_batches_share_each_file_type_evenly():
    # 300 MB of JPEG listed before 300 MB of PNG: filling in listing order would put all the
    # JPEGs (twice the decode work per MB) in one batch.
    listing = [NasFile("s", "t", f"s/t/{i:02d}.jpg", 30 * MB, 0) for i in range(10)]
    listing += [NasFile("s", "t", f"s/t/{i:02d}.png", 30 * MB, 0) for i in range(10, 20)]
    batches = plan_batches(listing, target_bytes=500 * MB, workers=2)
    assert len(batches) == 2
    for batch in batches:
        assert sum(f.size for f in batch) == 300 * MB
        assert sum(f.path.endswith(".jpg") for f in batch) == 5
        assert [f.path for f in batch] == sorted(f.path for f in batch)


def test_many_small_files_spread_over_every_slot_in_whole_rounds():
    small = [NasFile("s", "t", f"s/t/{i:06d}.png", 2_000, 0) for i in range(100_000)]
    batches = plan_batches(small, target_bytes=500 * MB, workers=2)
    # Bytes alone made one batch on one core; cost alone made 14 steps in 7 rounds, each
    # paying a process start: one batch per slot.
    assert len(batches) == 2
    sizes = [len(b) for b in batches]
    assert max(sizes) - min(sizes) <= 1
    sixteen = plan_batches(files([150] * 17), target_bytes=500 * MB, workers=16)
    assert len(sixteen) == 16  # 2.5 GB on 16 slots: one round, not 6 batches
    large = plan_batches(files([50] * 30), target_bytes=500 * MB, workers=2)
    assert len(large) == 4 and all(340 * MB <= sum(f.size for f in b) <= 400 * MB for b in large)


def _plan_by_scanning(listing: list[NasFile], count: int) -> list[list[str]]:
    """The greedy the heap replaced: every file scans every batch for the lightest."""
    from collections import defaultdict

    from craftflow_migrations.nas.batching import PER_FILE_COST_BYTES, _extension

    def cost(i):
        return listing[i].size + PER_FILE_COST_BYTES

    by_type = defaultdict(list)
    for i, f in enumerate(listing):
        by_type[_extension(f.path)].append(i)
    batches, loads = [[] for _ in range(count)], [0] * count
    for kind in sorted(by_type, key=lambda k: -sum(cost(i) for i in by_type[k])):
        kind_loads = [0] * count
        for i in sorted(by_type[kind], key=lambda i: -listing[i].size):
            b = min(range(count), key=lambda b: (kind_loads[b], loads[b]))
            batches[b].append(i)
            kind_loads[b] += cost(i)
            loads[b] += cost(i)
    return [[listing[i].path for i in sorted(batch)] for batch in batches if batch]


def test_the_lightest_batch_off_a_heap_is_the_one_a_scan_picks():
    import random

    rng = random.Random(7)
    for files_, workers in ((4_000, 2), (6_000, 16), (900, 7), (40, 5)):
        listing = [NasFile("s", "t", f"s/t/{i:05d}{rng.choice(['.png', '.JPG', '.jpg', '', '.tif', '.x.gif'])}",
                           rng.choice([rng.randint(1, 20_000), rng.randint(1, 90 * MB), 4_096]), 0)
                   for i in range(files_)]
        planned = plan_batches(listing, target_bytes=500 * MB, workers=workers)
        assert [[f.path for f in b] for b in planned] == _plan_by_scanning(listing, len(planned))

def _two_halves(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: every turn and flip of it looks different."""
    image = Image.new("RGB", (width, height), (220, 20, 20))
    image.paste((20, 20, 220), (width // 2, 0, width, height))
    return image


def _colour_at(thumbnail: Image.Image, x: float, y: float) -> str:
    r, _, b = thumbnail.getpixel((int(x * (thumbnail.width - 1)), int(y * (thumbnail.height - 1))))
    return "red" if r > b else "blue"


def test_thumbnails_are_upright_as_the_exif_orientation_says(tmp_path):
    """A phone photo is stored sideways with an orientation tag: its thumbnail is turned, small
    files included (they are otherwise their own thumbnail); the pHash stays imagehash's."""
    # Where the stored left half ends up once shown: (orientation, x, y of a red point).
    red_at = {1: (0.1, 0.5), 2: (0.9, 0.5), 3: (0.9, 0.5), 4: (0.1, 0.5),
              5: (0.5, 0.1), 6: (0.5, 0.1), 7: (0.5, 0.9), 8: (0.5, 0.9)}
    for size, fmt in (((1200, 600), "JPEG"), ((120, 60), "JPEG"), ((120, 60), "PNG"), ((1200, 600), "TIFF")):
        for orientation, (x, y) in red_at.items():
            exif = Image.Exif()
            exif[0x0112] = orientation
            path = tmp_path / f"o{orientation}-{size[0]}.{fmt.lower()}"
            _two_halves(*size).save(path, fmt, exif=exif.tobytes())
            facts = describe_image(path.read_bytes())
            assert facts.ok and facts.phash == str(imagehash.phash(Image.open(path), hash_size=16))
            thumb = Image.open(io.BytesIO(facts.thumbnail)).convert("RGB")
            turned = orientation >= 5
            assert (thumb.width < thumb.height) == turned, (fmt, size, orientation, thumb.size)
            assert _colour_at(thumb, x, y) == "red", (fmt, size, orientation)
            assert _colour_at(thumb, 1 - x, 1 - y) == "blue", (fmt, size, orientation)
    # A tag that is not an orientation, or EXIF that does not parse: shown as stored, never failed.
    for value in (0, 9, 65535):
        exif = Image.Exif()
        exif[0x0112] = value
        path = tmp_path / f"odd{value}.jpg"
        _two_halves(400, 200).save(path, exif=exif.tobytes())
        facts = describe_image(path.read_bytes())
        assert facts.ok and Image.open(io.BytesIO(facts.thumbnail)).size == (224, 112)
    path = tmp_path / "garbled.jpg"
    _two_halves(400, 200).save(path, exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    facts = describe_image(path.read_bytes())
    assert facts.ok and Image.open(io.BytesIO(facts.thumbnail)).size == (224, 112)


def test_the_stored_algorithm_names_the_imagehash_that_hashes():
    import imagehash

    from craftflow_migrations.nas.phash_algorithm import HASH_SIZE, PHASH_ALGORITHM

    assert PHASH_ALGORITHM == f"imagehash-{imagehash.__version__}:phash:hash_size={HASH_SIZE}"


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_every_mode_and_shape_pillow_opens_imports_with_a_browser_thumbnail():
    """Ten years of uploads hold more than RGB PNGs and JPEGs: 16-bit and float scans, CMYK
    print files, 1-bit line art, animations, multi-page TIFFs, slivers one pixel wide. Each
    imports with imagehash's pHash and a thumbnail a browser shows, upright, at most 224 px."""
    import numpy as np

    rng = np.random.default_rng(7)
    frames = [Image.new("RGB", (200, 200), (i, 0, 0)) for i in range(0, 250, 5)]
    sideways = Image.Exif()
    sideways[0x0112] = 6  # stored 2 x 9000, shown 9000 x 2
    cases = {
        "sliver across": (_encoded(Image.new("RGB", (20_000, 1), "red"), "PNG"), (224, 1)),
        "sliver down": (_encoded(Image.new("RGB", (3, 5_000)), "JPEG"), (1, 224)),
        "one pixel": (_encoded(Image.new("RGB", (1, 1)), "PNG"), (1, 1)),
        "16-bit grey": (_encoded(Image.fromarray(rng.integers(0, 65_535, (300, 300), dtype=np.uint16)), "PNG"),
                        (224, 224)),
        "float scan": (_encoded(Image.fromarray(rng.random((300, 300), dtype=np.float32)), "TIFF"), (224, 224)),
        "float, all NaN": (_encoded(Image.fromarray(np.full((300, 300), np.nan, np.float32)), "TIFF"), (224, 224)),
        "32-bit integers": (_encoded(Image.fromarray(rng.integers(-2**31, 2**31 - 1, (300, 300), dtype=np.int32)),
                                     "TIFF"), (224, 224)),
        "CMYK print file": (_encoded(Image.new("CMYK", (400, 300), (10, 20, 30, 40)), "JPEG"), (224, 168)),
        "CMYK TIFF": (_encoded(Image.new("CMYK", (400, 300), (10, 20, 30, 40)), "TIFF"), (224, 168)),
        "grey with alpha": (_encoded(Image.new("LA", (400, 300)), "PNG"), (224, 168)),
        "1-bit line art": (_encoded(Image.new("1", (400, 300)), "PNG"), (224, 168)),
        "1-bit, small": (_encoded(Image.new("1", (40, 30)), "PNG"), (40, 30)),
        "palette, transparent": (_encoded(Image.new("P", (300, 300)), "GIF", transparency=0), (224, 224)),
        "animated GIF": (_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), (200, 200)),
        "animated WebP": (_encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:10]), (200, 200)),
        "multi-page TIFF": (_encoded(Image.new("RGB", (300, 300)), "TIFF", save_all=True,
                                     append_images=[Image.new("RGB", (30, 3_000))]), (224, 224)),
        "JPEG 2000": (_encoded(Image.new("RGB", (300, 300)), "JPEG2000"), (224, 224)),
        "icon": (_encoded(Image.new("RGBA", (64, 64)), "ICO"), (64, 64)),
        "BMP": (_encoded(Image.new("RGB", (300, 300)), "BMP"), (224, 224)),
        "TGA": (_encoded(Image.new("RGB", (300, 300)), "TGA"), (224, 224)),
        "sideways sliver": (_encoded(Image.new("RGB", (2, 9_000)), "JPEG", exif=sideways), (224, 1)),
    }
    for name, (data, shown) in cases.items():
        facts = describe_image(data)
        assert facts.ok, (name, facts.error)
        assert facts.phash == str(imagehash.phash(Image.open(io.BytesIO(data)), hash_size=16)), name
        thumb = Image.open(io.BytesIO(facts.thumbnail))
        thumb.load()
        assert thumb.format in ("JPEG", "PNG", "GIF", "WEBP"), (name, thumb.format)
        assert thumb.size == shown, (name, thumb.size)


def test_a_thumbnail_has_the_size_pillow_would_give_it():
    import random

    from craftflow_migrations.nas.hashing import thumbnail_size

    rng = random.Random(3)
    for _ in range(2_000):
        width = rng.choice((rng.randint(1, 300), rng.randint(1, 4_000)))
        height = rng.choice((rng.randint(1, 20), rng.randint(1, 4_000)))
        image = Image.new("1", (width, height))
        image.thumbnail((224, 224))
        assert thumbnail_size(width, height) == image.size, (width, height)


def test_a_transparent_design_is_shown_on_white_without_a_dark_edge():
    """Under a design's transparent pixels lies a colour nobody sees. Shrunk, the design's
    edge must blend with white, as it shows on a page, never with that hidden colour; partly
    transparent paint is paint over white."""
    def design(size: tuple[int, int], hidden: tuple[int, int, int]) -> bytes:
        w, h = size
        image = Image.new("RGBA", size, (*hidden, 0))
        ImageDraw.Draw(image).ellipse((w // 10, h // 10, w - w // 10, h - h // 10), fill=(220, 30, 30, 255))
        ImageDraw.Draw(image).rectangle((0, 0, w // 20, h // 20), fill=(0, 0, 255, 128))  # half see-through
        return _encoded(image, "PNG")

    def pixels(thumbnail: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB")).astype(int)

    for size in ((1800, 1800), (700, 500), (230, 230)):
        over_black, over_green = (describe_image(design(size, hidden)).thumbnail for hidden in ((0, 0, 0), (0, 255, 0)))
        assert over_black == over_green, size
        flat = Image.new("RGB", size, "white")
        with Image.open(io.BytesIO(design(size, (0, 0, 0)))) as image:
            flat.paste(image, mask=image.getchannel("A"))
        on_white = pixels(describe_image(_encoded(flat, "PNG")).thumbnail)
        thumb = pixels(over_black)
        assert np.abs(thumb - on_white).mean() < 1.5, size
        assert np.abs(thumb[1, 1] - (127, 127, 255)).max() <= 12, (size, thumb[1, 1])
        assert thumb[-1, -1].min() >= 245, size


def test_every_mode_is_reduced_to_a_thumbnail_when_large():
    """Large images go through the box reduction first, whatever their mode."""
    rng = np.random.default_rng(1)
    h, w = 700, 1000
    grey, rgb = rng.integers(0, 255, (h, w), dtype=np.uint8), rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cases = {
        "L": _encoded(Image.fromarray(grey), "PNG"),
        "LA": _encoded(Image.fromarray(rng.integers(0, 255, (h, w, 2), dtype=np.uint8), "LA"), "PNG"),
        "1": _encoded(Image.fromarray(grey).convert("1"), "PNG"),
        "P": _encoded(Image.fromarray(rgb).convert("P"), "PNG"),
        "P, transparent": _encoded(Image.fromarray(rgb).convert("P"), "GIF", transparency=3),
        "RGB, a transparent colour": _encoded(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)),
        "L, a transparent grey": _encoded(Image.fromarray(grey), "PNG", transparency=5),
        "I;16": _encoded(Image.fromarray(rng.integers(0, 65_535, (h, w), dtype=np.uint16)), "PNG"),
        "F": _encoded(Image.fromarray(rng.random((h, w), dtype=np.float32)), "TIFF"),
        "CMYK": _encoded(Image.new("CMYK", (w, h), (10, 20, 30, 40)), "JPEG"),
        "RGBA": _encoded(Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA"), "WEBP"),
    }
    for name, data in cases.items():
        facts = describe_image(data)
        assert facts.ok and facts.thumbnail, name
        with Image.open(io.BytesIO(facts.thumbnail)) as thumb:
            assert (thumb.format, thumb.size) == ("JPEG", (224, 157)), (name, thumb.format, thumb.size)
