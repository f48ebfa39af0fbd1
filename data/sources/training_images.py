"""Is an image one of a run's training images? The same file or tar sample, or a copy with the
same content, whatever source either side comes from (files, a Hugging Face dataset's cached
images, tar shards).

Sizes first, hashes only where needed: copies have equal sizes, so only images with the size of
some training image are hashed, and only the training images of those sizes. A file's hash comes
from the audit's measurement cache while the file is unchanged (size and mtime), keyed by its
path relative to the folder the audit ran on, which for a dataset whose images were written out
is the cache folder, not data.root. A shard sample's size is in the index.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

from data.audit import cache_key
from data.audit_cache import MeasurementCache, audit_dir_for
from data.sources.stores import FILES


class TrainingImages:
    """A run's training images, to count which of some other images are among them.

    `store` reads `paths` (a data.sources.ImageStore); `cached_sha256(path)` answers from a
    cache, or returns None to have the image read."""

    def __init__(self, paths: list[str], store, cached_sha256: Callable[[str], str | None] | None = None):
        self.paths, self.store = [str(p) for p in paths], store
        self.cached_sha256 = cached_sha256 or (lambda path: None)

    @classmethod
    def of_files(cls, paths: list[str], root: Path, audit_dir: str = "") -> TrainingImages:
        """Image files under `root` (the folder the run's audit measured), with its cached hashes."""
        cache = MeasurementCache(audit_dir_for(root, audit_dir))

        def cached(path: str) -> str | None:
            stat = os.stat(path)
            entry = cache.get(cache_key(path, root), stat.st_size, stat.st_mtime_ns)
            return entry.get("sha256") if entry else None

        return cls(paths, FILES, cached)

    def count_among(self, paths: list[Path], store=FILES) -> int:
        """How many of `paths` (read by `store`) are training images."""
        resolved = {Path(p).resolve() for p in self.paths}
        by_size: dict[int, list[str]] = defaultdict(list)
        for p in self.paths:
            by_size[_size(self.store, p)].append(p)
        by_size.pop(-1, None)  # unreadable: neither counted nor hashed
        count, hashes, hashed_sizes = 0, set(), set()
        for path in paths:
            if Path(path).resolve() in resolved:
                count += 1
                continue
            size = _size(store, str(path))
            if size not in by_size:
                continue
            if size not in hashed_sizes:
                hashed_sizes.add(size)
                hashes |= {self._sha256(p) for p in by_size[size]}
            try:
                count += store.sha256(str(path)) in hashes
            except OSError:
                pass  # predict_files reports the image as unreadable
        return count

    def _sha256(self, path: str) -> str:
        try:
            return self.cached_sha256(path) or self.store.sha256(path)
        except OSError:
            return ""


def _size(store, path: str) -> int:
    try:
        return store.size(path)
    except OSError:
        return -1
