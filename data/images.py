"""Decode image files to uint8 RGB, whatever their mode (gray, palette, RGBA, CMYK, 16-bit, EXIF-rotated).

One decode path serves both the audit and training: `decode_rgb` is what the audit checks, so a
file the audit passes is a file the DataLoader can read. It imports no torch, so audit worker
processes start quickly.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from PIL import Image, ImageOps

# PIL's own default guard (about 89.5 megapixels); `data.max_image_pixels` overrides it.
DEFAULT_MAX_PIXELS = 89_478_485


class DecompressionBomb(ValueError):
    """An image whose header claims more pixels than the configured limit."""

    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
                         f"(data.max_image_pixels)")
        self.width, self.height = width, height


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # 16-bit and 32-bit grayscale: scale to 8 bits instead of letting convert() clip at 255.
    array = np.asarray(image, dtype=np.float32)
    top = 65535.0 if array.max() > 255 else 255.0
    return Image.fromarray((np.clip(array, 0, top) / top * 255.0).round().astype(np.uint8))


@contextlib.contextmanager
def _pil_limit_off():
    # Image.open raises DecompressionBombError above twice PIL's global limit before we can check
    # ours. Processes (DataLoader and audit workers) each hold their own copy of this global.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A fully decoded (H, W, 3) uint8 array. Raises DecompressionBomb above `max_pixels`, and
    PIL's errors (UnidentifiedImageError, OSError for truncated data, ...) for damaged files."""
    with warnings.catch_warnings():
        # Our own limit (checked below, before decoding) replaces PIL's warning/exception pair, so
        # the message can name the config key and a lower limit is honoured too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _pil_limit_off():
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise DecompressionBomb(width, height, max_pixels)
                image.load()  # decode every byte now: a header check misses truncated files
                image = ImageOps.exif_transpose(image)
                if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    image = _to_8bit_gray(image)
                if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
                    # Transparent pixels become white, not whatever color hides under alpha = 0.
                    rgba = image.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, rgba)
                # CMYK, YCbCr, LAB, 1-bit and the rest: PIL's conversion to RGB.
                rgb = image.convert("RGB")
                return np.asarray(rgb, dtype=np.uint8).copy()


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A (3, H, W) uint8 torch tensor, decoded by `decode_rgb`."""
    import torch

    return torch.from_numpy(decode_rgb(path, max_pixels)).permute(2, 0, 1).contiguous()
