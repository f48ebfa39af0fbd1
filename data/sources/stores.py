"""Where a source's images are stored, and how they are read: `FILES` (the path is an image
file) or, for tar shards, data.shards.ShardMembers (the path is a `SHARD.tar#KEY` reference)."""

from __future__ import annotations

import os
from typing import Protocol

from data.files import sha256_file


class ImageStore(Protocol):
    """Reads a source's image paths. Sizes and contents tell training images apart;
    `with_transform` gives what a dataset decodes the paths with (`.load(path, max_pixels)`)."""

    def size(self, path: str) -> int: ...

    def sha256(self, path: str) -> str: ...

    def with_transform(self, transform): ...


class ImageFiles:
    """Images that are files: the path is the file."""

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def sha256(self, path: str) -> str:
        return sha256_file(path)

    def with_transform(self, transform):
        return transform  # an ImageTransform reads files itself

    def __repr__(self) -> str:
        return "FILES"


FILES = ImageFiles()
