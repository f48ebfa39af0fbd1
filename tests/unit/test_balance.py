"""Balanced sampling: deterministic per (seed, epoch), sharded without overlap, equal classes."""

from __future__ import annotations

from collections import Counter

import torch

from data.balance import BalancedDraw, balanced_class_weights
from data.sampling import ResumableSampler

LABELS = [0] * 600 + [1] * 300 + [2] * 60


def test_draw_depends_only_on_seed_and_epoch_and_shards_partition_it():
    a, b = BalancedDraw(LABELS, seed=1), BalancedDraw(LABELS, seed=1)
    assert a.indices(0) == b.indices(0) and a.indices(0) != a.indices(1)
    assert a.indices(0) != BalancedDraw(LABELS, seed=2).indices(0)
    # Training shards the draw with ResumableSampler: the shares together are exactly one draw.
    shards = [ResumableSampler(len(LABELS), batch_size=16, seed=1, rank=r, world_size=3, draw=a.indices)
              for r in range(3)]
    for s in shards:
        s.start_epoch(5)
    drawn = [[i for i, _ in s] for s in shards]
    assert len({len(d) for d in drawn}) == 1 and sum(map(len, drawn)) == len(LABELS)
    assert Counter(i for d in drawn for i in d) == Counter(a.indices(5))
    shares = Counter(LABELS[i] for i in a.indices(5))
    assert all(abs(n / len(LABELS) - 1 / 3) < 0.05 for n in shares.values())


def test_balanced_class_weights_follow_sklearn():
    weights = balanced_class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2, 0.0]))
