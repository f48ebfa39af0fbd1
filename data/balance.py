"""Class balance: a class-balanced draw of each epoch's training order, and loss weights.

`BalancedDraw(labels, seed).indices(epoch)` is one epoch's indices, drawn with replacement, each
class equally likely, from a generator seeded by (seed, epoch) alone: every process computes the
same draw without talking to the others, and a resumed run draws it again. It is the `draw` of
`data.sampling.ResumableSampler`, which shards it across processes and can start it mid-way.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch


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


class BalancedDraw:
    """Epochs as long as the dataset, in which every class is drawn equally often on average."""

    def __init__(self, labels: Sequence[int], seed: int = 0):
        self.weights = class_balanced_weights(labels)
        self.seed = seed
        self.total = len(labels)

    def indices(self, epoch: int) -> list[int]:
        """The whole epoch's draw (all processes together), a pure function of (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.multinomial(self.weights, self.total, replacement=True, generator=generator).tolist()
