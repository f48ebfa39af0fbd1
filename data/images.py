"""Decode image files to uint8 RGB tensors, whatever their mode (gray, palette, RGBA, CMYK, 16-bit)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(path: str) -> torch.Tensor:
    """A (3, H, W) uint8 tensor. PIL handles every format and mode; EXIF rotation is applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits instead of letting convert() clip.
            array = np.asarray(image, dtype=np.float32)
            top = 65535.0 if array.max() > 255 else 255.0
            image = Image.fromarray((array / top * 255.0).round().astype(np.uint8))
        if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
            # Transparent pixels become white, not whatever color hides under alpha = 0.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        rgb = image.convert("RGB")
        array = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
