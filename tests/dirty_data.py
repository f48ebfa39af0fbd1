"""A dirty image folder with every kind of bad and odd file, and what the audit should say about each."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import make_image

# Pixel limit the tests configure, so a 64x64 PNG counts as a decompression bomb (16x16 ones pass).
BOMB_LIMIT = 1000

# relative path -> expected problem (None: a valid image, possibly odd, that must pass).
EXPECTED: dict[str, str | None] = {
    "train/cat/empty.jpg": "empty",
    "train/cat/error_page.jpg": "not_image",
    "train/dog/notes.png": "not_image",
    "train/cat/truncated.jpg": "corrupt",
    "train/dog/corrupt.png": "corrupt",
    "train/dog/bomb.png": "decompression_bomb",
    "train/cat/tiny.png": "too_small",
    "train/cat/dup_b.png": "duplicate",  # dup_a.png is the copy that stays
    "train/cat/conflict.png": "conflicting_labels",
    "train/dog/conflict_copy.png": "conflicting_labels",
    "val/dog/leak_copy.png": "leakage",  # train/dog/leak.png stays
    "train/cat/dup_a.png": None,
    "train/dog/leak.png": None,
    "train/cat/gray.png": None,
    "train/cat/palette_transparent.png": None,
    "train/cat/rgba.png": None,
    "train/dog/cmyk.jpg": None,
    "train/dog/gray16.png": None,
    "train/dog/exif_rotated.jpg": None,
    "train/cat/UPPER.JPG": None,
    "train/dog/image.webp": None,
    "train/dog/image.bmp": None,
}
IGNORED_SYSTEM = [".DS_Store", "train/cat/.DS_Store", "train/dog/Thumbs.db"]
IGNORED_OTHER = ["labels.csv", "train/cat/readme.txt"]
CHANNEL = {"cat": 0, "dog": 2}  # red-ish cats, blue-ish dogs: learnable by a tiny CNN


def _jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kw)
    return buffer.getvalue()


def make_dirty_folder(root: Path, clean_per_class: int = 10, val_per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", clean_per_class), ("val", val_per_class)):
        for name, channel in CHANNEL.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(rng, channel).save(folder / f"{name}_{i:03d}.png")
    cat, dog = root / "train" / "cat", root / "train" / "dog"

    # Unusable files
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "error_page.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    (dog / "notes.png").write_text("this is not a picture\n")
    whole = _jpeg_bytes(make_image(rng, 0, size=24))
    (cat / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    buffer = io.BytesIO()
    make_image(rng, 2, size=24).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    middle = len(png) // 2
    png[middle:middle + 40] = bytes(40)  # zeroed compressed data: CRC and zlib both fail
    (dog / "corrupt.png").write_bytes(bytes(png))
    make_image(rng, 2, size=64).save(dog / "bomb.png")
    make_image(rng, 0, size=2).save(cat / "tiny.png")

    # Duplicates
    make_image(rng, 0).save(cat / "dup_a.png")
    (cat / "dup_b.png").write_bytes((cat / "dup_a.png").read_bytes())
    make_image(rng, 0).save(cat / "conflict.png")
    (dog / "conflict_copy.png").write_bytes((cat / "conflict.png").read_bytes())
    make_image(rng, 2).save(dog / "leak.png")
    (root / "val" / "dog" / "leak_copy.png").write_bytes((dog / "leak.png").read_bytes())

    # Valid oddities
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(cat / "gray.png")
    palette = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 200, 30, 30, 0, 0, 0, 250, 10, 10] + [0] * 756)
    palette.info["transparency"] = 2
    palette.save(cat / "palette_transparent.png", transparency=2)
    rgba = np.concatenate([np.asarray(make_image(rng, 0)), np.full((16, 16, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(cat / "rgba.png")
    make_image(rng, 2).convert("CMYK").save(dog / "cmyk.jpg", "JPEG")
    gray16 = rng.integers(0, 65535, (16, 16), dtype=np.uint16)
    Image.fromarray(gray16).save(dog / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    make_image(rng, 2, size=16).resize((24, 16)).save(dog / "exif_rotated.jpg", exif=exif.tobytes())
    make_image(rng, 0).save(cat / "UPPER.JPG", "JPEG")
    make_image(rng, 2).save(dog / "image.webp", "WEBP")
    make_image(rng, 2).save(dog / "image.bmp", "BMP")

    # Ignored files
    for rel in IGNORED_SYSTEM:
        (root / rel).write_bytes(b"\x00\x01junk")
    (root / "labels.csv").write_text("path,label\n")
    (cat / "readme.txt").write_text("cats\n")
    return root


def expected_problems() -> dict[str, str]:
    return {rel: kind for rel, kind in EXPECTED.items() if kind}
