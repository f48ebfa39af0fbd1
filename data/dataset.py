"""A labelled list of image files as a torch Dataset, and the DataLoaders built on it."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from data.folders import Sample
from data.images import load_rgb


class ImageListDataset(Dataset):
    def __init__(self, samples: list[Sample], transform: Callable | None = None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool,
                seed: int) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        # Workers outlive the epoch: re-forking them every epoch costs seconds on big datasets.
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=False,
    )
