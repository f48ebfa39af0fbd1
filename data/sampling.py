"""Training order that can stop at any batch and continue exactly, on any number of processes.

The order of an epoch is a permutation drawn from (seed, epoch) alone, so a resumed run draws the
same one without any saved sampler state. It is padded to a multiple of the process count (the
first items repeat, as torch's DistributedSampler does), the `samples_done` already trained on are
skipped, and process `rank` takes every `world_size`-th of the rest. With the same process count
this is exactly the batches the uninterrupted run would have seen next; with another count it
continues from the same number of samples seen.

Augmentation randomness replays too: every sample is fetched with the python, numpy and torch
RNGs seeded from (seed, epoch, its position in the epoch's order), whatever process or worker
fetches it. torchvision's v2 transforms draw from torch's global RNG inside the worker, so seeding
that per sample is what makes a replayed batch bit-for-bit the same. Position is what
(rank, batch, slot in batch) amounts to for a fixed process count, and unlike them it does not
change when the process count does.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from data.dataset import Loading

_ORDER, _AUGMENT, _WORKERS, _COLLATE = 0x5EED_0, 0x5EED_1, 0x5EED_2, 0x5EED_3  # keep the seed streams apart


def derived_seeds(*key: int, count: int = 1) -> np.ndarray:
    """`count` independent 63-bit seeds from integers, the same in every process and Python run."""
    entropy = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in key]
    return np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint64) >> np.uint64(1)


@runtime_checkable
class ResumableOrder(Protocol):
    """What the run state and the loop read of a training order (ResumableSampler, and the shards
    source's ShardOrder): its size and steps, where an epoch starts, and what a checkpoint records
    so a resume can tell whether the order it continues is the one it left."""

    epoch: int
    samples_done: int

    @property
    def order_key(self) -> dict:
        """Settings the order depends on besides (seed, epoch, process count), by config key."""

    @property
    def padded_size(self) -> int:
        """Samples in one epoch over all processes, padded to a multiple of the process count."""

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on each process."""

    @property
    def samples_per_step(self) -> int:
        """Samples all processes together consume per batch."""

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """Start `epoch` after the first `samples_done` samples (counted over all processes)."""


class ResumableSampler(Sampler):
    """Yields (dataset index, augmentation seed) for this process's share of one epoch."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, draw: Callable[[int], list[int]] | None = None):
        """`draw(epoch)`: the epoch's whole order of `num_samples` indices (e.g. a class-balanced draw
        with replacement), a pure function of the epoch; default: a permutation from (seed, epoch)."""
        if num_samples < 1:
            raise ValueError("the training split is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.draw = rank, world_size, shuffle, draw
        self.epoch, self.samples_done = 1, 0

    @property
    def order_key(self) -> dict:
        """Settings the epoch's order depends on besides (seed, epoch, process count), by config
        key: none here (data.shards' order also depends on the loader workers)."""
        return {}

    @property
    def padded_size(self) -> int:
        return math.ceil(self.num_samples / self.world_size) * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.padded_size // self.world_size / self.batch_size)

    @property
    def samples_per_step(self) -> int:
        """Samples all processes together consume per step (the last step of an epoch may take fewer)."""
        return self.batch_size * self.world_size

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        """Start `epoch` after the first `samples_done` samples (counted over all processes).

        Not called set_epoch on purpose: Accelerate's loader calls set_epoch with its own counter."""
        self.epoch, self.samples_done = epoch, min(max(samples_done, 0), self.padded_size)

    def _positions(self) -> np.ndarray:
        """Positions in the padded order of the epoch that this process fetches, in order."""
        rest = np.arange(self.samples_done, self.padded_size)
        if len(rest) % self.world_size:  # only after resuming with another process count
            pad = self.world_size - len(rest) % self.world_size
            rest = np.concatenate([rest, rest[:pad]])
        return rest[self.rank::self.world_size]

    def __iter__(self):
        if self.draw is not None:
            order = np.asarray(self.draw(self.epoch), dtype=np.int64)
        elif self.shuffle:
            g = torch.Generator().manual_seed(int(derived_seeds(self.seed, self.epoch, _ORDER)[0]))
            order = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            order = np.arange(self.num_samples)
        order = np.concatenate([order, order[: self.padded_size - self.num_samples]])
        seeds = derived_seeds(self.seed, self.epoch, _AUGMENT, count=self.padded_size)
        for position in self._positions():
            yield int(order[position]), int(seeds[position])

    def __len__(self) -> int:
        return len(self._positions())


class SeededSamples(Dataset):
    """Fetches `dataset[index]` with the RNGs seeded for that sample, then puts them back.

    Putting them back matters with num_workers = 0, where the fetch runs in the training process
    and must not disturb the RNG that dropout and the rest of training draw from.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        """(seed, sample): the seed travels on to SeededCollate."""
        index, seed = key
        return seed, seeded_call(seed, self.dataset.__getitem__, index)


def seeded_call(seed: int, fn: Callable, *args):
    """fn(*args) with the python, numpy and torch CPU RNGs seeded, then put back as they were."""
    if get_worker_info() is not None:
        # In a DataLoader worker every fetch reseeds, so nothing needs putting back (and saving
        # numpy's state costs more than the seeding).
        _seed_cpu_rngs(seed)
        return fn(*args)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        _seed_cpu_rngs(seed)
        return fn(*args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _seed_cpu_rngs(seed: int) -> None:
    # Not torch.manual_seed: it also seeds every CUDA device, 50x slower, and samples are CPU work.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SeededCollate:
    """(seed, (image, label)) pairs -> (images, labels, batch seed): the first sample's seed
    travels with the batch, so batch-level randomness on the device (MixUp, CutMix, random
    erasing) replays like the per-sample augmentation does."""

    def __init__(self, collate: Callable = default_collate):
        self.collate = collate

    def __call__(self, pairs):
        seeds, samples = zip(*pairs)
        images, labels = self.collate(list(samples))
        return images, labels, seeds[0] ^ _COLLATE  # a Python int: reading it back never waits on the device


class FinishedBatches:
    """What every source of training batches shares: `sampler` restarts an epoch anywhere,
    `loader` yields (images, labels, batch seed) on the device, `finish` completes each batch there
    under its own seed (data.transforms.BatchFinish)."""

    sampler: object
    loader: object
    finish: Callable | None

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        self.sampler.start_epoch(epoch, samples_done)

    def __iter__(self):
        for images, labels, seed in self.loader:
            if self.finish is None:
                yield images, labels
            else:
                yield seeded_call(seed, self.finish, images, labels)


class TrainBatches(FinishedBatches):
    """This process's training batches for an epoch, on its device, resumable at any batch.

    Not sharded by `accelerator.prepare`: Accelerate would shard and pad the batches again and
    could not start an epoch in the middle; the sampler shards instead. It is still wrapped as a
    one-process Accelerate loader, which moves batches to the device (non-blocking from pinned
    memory) and tells gradient accumulation where the epoch ends. Batches arrive as the workers
    made them (uint8 images); `finish` (data.transforms.BatchFinish) turns them into what the model
    takes, on the device, with the CPU RNG seeded from the batch's seed.
    """

    def __init__(self, dataset: Dataset, batch_size: int, loading: Loading, seed: int,
                 accelerator, draw: Callable[[int], list[int]] | None = None, finish: Callable | None = None):
        rank, world = accelerator.process_index, accelerator.num_processes
        self.sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world, draw=draw)
        # Workers get their base seed from this generator, not from the global RNG: drawing from
        # the global RNG whenever an epoch's iterator starts would make a resumed run diverge.
        generator = torch.Generator().manual_seed(int(derived_seeds(seed, rank, _WORKERS)[0]))
        loader = DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=self.sampler,
                            generator=generator, drop_last=False, collate_fn=SeededCollate(loading.collate),
                            **loading.kwargs())
        self.loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                          put_on_device=True, rng_types=[], non_blocking=loading.pin_memory)
        self.finish = finish

    def __len__(self) -> int:
        return len(self.loader)

