"""Image folders: discovery and splits, decoding, transforms and loaders.

This package is code. Keep datasets elsewhere (for example `datasets/NAME`, which git ignores).
"""

from data.dataset import ImageListDataset, make_loader
from data.folders import Splits, discover
from data.images import load_rgb
from data.transforms import Preprocessing, resolve_normalization, train_transform

__all__ = ["ImageListDataset", "Splits", "Preprocessing", "discover", "load_rgb", "make_loader",
           "resolve_normalization", "train_transform"]
