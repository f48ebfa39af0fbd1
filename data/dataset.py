"""A labelled list of image files as a torch Dataset, and the DataLoaders built on it."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from data.folders import Sample
from data.images import DEFAULT_MAX_PIXELS, load_rgb

# How many neighbours to try before deciding the data, not one file, is broken.
_MAX_SUBSTITUTES = 16


class ImageListDataset(Dataset):
    """(uint8 image, label) pairs, through `transform` (a data.transforms.ImageTransform). A file
    that fails to decode (changed since the audit, or the audit was off) is recorded in `failure_log` (JSON lines) and replaced by the next readable sample,
    so one bad file never ends an epoch."""

    def __init__(self, samples: list[Sample], transform=None,
                 failure_log: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples = samples
        self.transform = transform
        self.failure_log = str(failure_log) if failure_log else None
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def record_failure(self, path: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"warning: skipped {path}: {message}", file=sys.stderr, flush=True)
        if self.failure_log:
            # One short O_APPEND write per line: lines from several workers and ranks never interleave.
            line = json.dumps({"path": path, "error": message}) + "\n"
            fd = os.open(self.failure_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(_MAX_SUBSTITUTES, len(self.samples))):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                # The transform decodes: its crop plan decides how many pixels are decoded at all.
                image = self.transform.load(path, self.max_pixels) if self.transform else load_rgb(path, self.max_pixels)
            except Exception as e:  # any decode failure: PIL raises many types
                self.record_failure(path, e)
                continue
            return image, label
        raise RuntimeError(f"{_MAX_SUBSTITUTES} consecutive files failed to load near {self.samples[index][0]}; "
                           f"run `python launch/audit.py DATA_ROOT` to find what is wrong with the data")


def read_load_failures(path: str | Path) -> list[dict]:
    """The distinct files recorded by ImageListDataset as failing to load."""
    path = Path(path)
    if not path.is_file():
        return []
    seen = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        seen.setdefault(record["path"], record)
    return list(seen.values())


@dataclass(frozen=True)
class Loading:
    """How a DataLoader feeds a process: workers, pinning, prefetch depth."""

    num_workers: int
    pin_memory: bool = False
    prefetch_factor: int = 2  # batches each worker keeps ready
    collate: Callable = default_collate  # samples -> a batch (data.device_decode has its own)

    def kwargs(self) -> dict:
        if self.num_workers == 0:
            return {"num_workers": 0, "pin_memory": self.pin_memory}
        # Workers outlive the epoch: re-forking them every epoch costs seconds on big datasets.
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory, "persistent_workers": True,
                "prefetch_factor": self.prefetch_factor}


def make_loader(dataset: Dataset, batch_size: int, loading: Loading, seed: int) -> DataLoader:
    """An evaluation loader, in order (training batches come from data.sampling.TrainBatches)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator, drop_last=False,
                      collate_fn=loading.collate, **loading.kwargs())
