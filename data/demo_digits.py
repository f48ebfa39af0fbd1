"""The demo's dataset: scikit-learn's bundled handwritten digits written out as an image folder.

1,797 real 8x8 grayscale scans in 10 classes; no network needed. Written once, then reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

COMPLETE_MARKER = ".complete"


def write_digits_folder(dest: str | Path) -> Path:
    dest = Path(dest)
    if (dest / COMPLETE_MARKER).exists():
        return dest
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        class_dir = tmp / str(label)
        class_dir.mkdir(exist_ok=True)
        # The bundled values run 0..16; stretch them to 0..255 for an ordinary 8-bit PNG.
        image = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8))
        image.save(class_dir / f"digit_{index:04d}.png")
    (tmp / COMPLETE_MARKER).touch()
    if dest.exists():  # a stale, incomplete folder from an interrupted earlier run
        import shutil

        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
