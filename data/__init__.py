"""Image folders: discovery and splits, decoding, transforms and loaders.

This package is code. Keep datasets elsewhere (for example `datasets/NAME`, which git ignores).

The names below load on first use (PEP 562): `import data.files` or `data.processes` must not
import torch, since the search driver and the launch scripts' argument parsing use them without it.
"""

from __future__ import annotations

import importlib

_WHERE = {"ImageListDataset": "data.dataset", "make_loader": "data.dataset", "Splits": "data.folders",
          "discover": "data.folders", "load_rgb": "data.images", "Preprocessing": "data.transforms",
          "resolve_normalization": "data.transforms", "train_transform": "data.transforms"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
