"""Decode image files to uint8 RGB, whatever their mode (gray, palette, RGBA, CMYK, 16-bit, EXIF-rotated).

One decode path serves both the audit and training: `decode_rgb` is what the audit checks, so a
file the audit passes is a file the DataLoader can read. It imports no torch, so audit worker
processes start quickly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, NamedTuple

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


class Region(NamedTuple):
    """The part of an upright image to keep and the size to resize it to."""

    box: tuple[float, float, float, float]  # left, top, right, bottom, in the image's pixels
    size: tuple[int, int]  # output width, height
    # A JPEG is decoded at the smallest DCT scale giving at least `oversample` x `size` pixels over
    # the box. 1 is fastest; 2 leaves the final resize to do the antialiasing, which keeps the
    # result within about a grey level of full decode + resize (the DCT scaling alone is a
    # different low-pass filter, up to 3 grey levels off on detailed photos).
    oversample: float = 1.0


# A crop plan: `plan(width, height)` of the upright image -> the Region to decode, or None for all of it.
CropPlan = Callable[[int, int], "Region | None"]

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS, plan: CropPlan | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 array. Raises DecompressionBomb above `max_pixels`, and PIL's errors
    (UnidentifiedImageError, OSError for truncated data, ...) for damaged files.

    With a `plan`, the array is the planned region resized to the planned size. The plan is drawn
    from the header's size before any pixel is decoded, so a JPEG is decoded only at the smallest
    DCT scale (1/2, 1/4, 1/8) that still covers the region at its output size, as FFCV's and
    DALI's random-resized-crop decoders do; every other image is decoded whole first. Either way
    the crop and resize happen once, in uint8."""
    with warnings.catch_warnings():
        # Our own limit (checked below, before decoding) replaces PIL's warning/exception pair, so
        # the message can name the config key and a lower limit is honoured too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _pil_limit_off():
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise DecompressionBomb(width, height, max_pixels)
                orientation = orientation_of(image)
                upright = (height, width) if orientation in _TRANSPOSED else (width, height)
                region = plan(*upright) if plan is not None else None
                if region is not None and orientation == 1 and scalable_jpeg(image):
                    return _decode_region_scaled(image, region)
                rgb = _upright_rgb(image)
                if region is not None:
                    rgb = rgb.resize(region.size, Image.Resampling.BILINEAR, box=region.box)
                return np.asarray(rgb, dtype=np.uint8).copy()


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1: upright). Parsing EXIF costs more than a small JPEG's resize, and a
    JPEG without an Exif block has none."""
    if image.format == "JPEG" and "exif" not in image.info:
        return 1
    return image.getexif().get(_EXIF_ORIENTATION, 1)


def scalable_jpeg(image: Image.Image) -> bool:
    """A JPEG any decoder can scale and crop as it is: RGB or gray (CMYK and Adobe-inverted ones
    need PIL's full conversion; transparency cannot occur)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def _decode_region_scaled(image: Image.Image, region: Region) -> np.ndarray:
    width, height = image.size
    (left, top, right, bottom), size = region.box, region.size
    # The smallest decode whose pixels over the box still number oversample x the output size.
    wanted = (max(1, math.ceil(width * size[0] * region.oversample / max(right - left, 1e-6))),
              max(1, math.ceil(height * size[1] * region.oversample / max(bottom - top, 1e-6))))
    image.draft(image.mode, wanted)
    scale_x, scale_y = width / image.size[0], height / image.size[1]
    scaled = (left / scale_x, top / scale_y, right / scale_x, bottom / scale_y)
    out = image.resize(size, Image.Resampling.BILINEAR, box=scaled)  # decodes every byte: truncation still raises
    if out.mode != "RGB":
        out = out.convert("RGB")
    return np.asarray(out, dtype=np.uint8).copy()


def _upright_rgb(image: Image.Image) -> Image.Image:
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
    return image.convert("RGB")


def load_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS, plan: CropPlan | None = None):
    """A (3, H, W) uint8 torch tensor, decoded by `decode_rgb`."""
    import torch

    return torch.from_numpy(decode_rgb(path, max_pixels, plan)).permute(2, 0, 1)  # a view: the collate copies once anyway
