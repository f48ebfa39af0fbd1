"""Class balance: a weighted sampler that works under DDP, and loss weights.

`BalancedSampler` draws each epoch's indices with replacement, each class equally likely, from a
generator seeded by (seed, epoch) alone, so every process computes the same draw without talking
to the others. It then keeps every `num_replicas`-th index starting at `rank`: each process gets
its own share and the shares together are one epoch as long as the dataset.

Under `accelerator.prepare` leave `num_replicas=1`: Accelerate shards the loader's batches across
processes itself (and calls `set_epoch`). Pass `num_replicas`/`rank` when building a per-process
loader by hand.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights 1 / (size of its class): every class has the same total weight."""
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Loss weights n / (k * n_c), scikit-learn's "balanced": a class seen half as often counts twice.
    A class with no samples gets weight 0 (it never appears as a target anyway)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    present = int((counts > 0).sum())  # k counts classes that occur, so the weights average to 1 per sample
    weights = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros(()))
    return weights.float()


class BalancedSampler(Sampler[int]):
    def __init__(self, labels: Sequence[int], seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 num_samples: int | None = None):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.weights = class_balanced_weights(labels)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        # The whole epoch, rounded up so every process gets the same number of indices.
        self.total = math.ceil((num_samples or len(labels)) / num_replicas) * num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        """The whole epoch's draw (all processes), a pure function of (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.multinomial(self.weights, self.total, replacement=True, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.total // self.num_replicas
