"""data.batch_size = "auto": the largest per-process batch that trains on this GPU, with room to spare.

The search runs a real training step (forward, backward, optimizer step) of a throwaway copy of
the model at doubling batch sizes until CUDA runs out of memory, bisects between the last size
that fit and the first that did not, and keeps SAFETY of the largest fit: the real loader's
batches, the allocator's fragmentation and cuDNN's workspace choices need room the probe did not
see. On CPU there is no memory wall to find, so the default is used, said so in one line.

The number found replaces "auto" in the config, so config.toml and every checkpoint record it and
a re-run from them trains with the same batch. With `train.global_batch_size`, the global batch
is kept and `train.grad_accum_steps` makes up what one step cannot hold; the record then holds
the batch and the accumulation (and global_batch_size 0), which a re-run takes as they are.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from configs.errors import ConfigError, TrainingFailed

SAFETY = 0.875  # share of the largest batch that fit that training uses
CPU_DEFAULT = 32
MAX_BATCH = 4096
_BISECT_PRECISION = 16  # stop bisecting when the gap is under 1/16 of the fit: SAFETY rounds finer steps away


@dataclass
class BatchSearch:
    """What the search tried and found."""

    largest_fit: int = 0  # the largest size whose step ran
    first_oom: int | None = None  # the smallest size that ran out of memory; None: the cap fit
    tried: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """What training uses: SAFETY of the largest fit (all of it when even the cap fit), a multiple
        of 8 from 16 on (tensor-core friendly shapes)."""
        if self.first_oom is None:
            return self.largest_fit
        kept = max(1, math.floor(self.largest_fit * SAFETY))
        return kept - kept % 8 if kept >= 16 else kept

    def describe(self) -> str:
        if self.first_oom is None:
            return f"the cap of {self.largest_fit} fit"
        return (f"largest that fit {self.largest_fit}, out of memory at {self.first_oom}, kept {SAFETY:.1%}; "
                f"tried {', '.join(map(str, self.tried))}")


def is_out_of_memory(error: BaseException) -> bool:
    # cuBLAS/cuDNN report a failed allocation as a plain RuntimeError; so does torch's CPU allocator.
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def release_memory() -> None:
    gc.collect()  # the failed step's tensors, held by the traceback until now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def search_batch_size(try_step: Callable[[int], None], cap: int = MAX_BATCH) -> BatchSearch:
    """The largest batch in [1, cap] for which `try_step(n)` does not run out of memory: doubling
    from 1, then bisecting the gap. Raises TrainingFailed when not even one image fits."""
    search = BatchSearch()

    def fits(n: int) -> bool:
        search.tried.append(n)
        try:
            try_step(n)
            ok = True
        except Exception as e:  # noqa: BLE001 - anything but out-of-memory is a real failure
            if not is_out_of_memory(e):
                raise
            ok = False
        if not ok:
            release_memory()  # outside the except block: the exception no longer pins the step's tensors
        return ok

    n = 1
    while True:
        if not fits(n):
            search.first_oom = n
            break
        search.largest_fit = n
        if n >= cap:
            return search
        n = min(2 * n, cap)
    if search.largest_fit == 0:
        raise TrainingFailed("data.batch_size = 'auto': not even one image fits in GPU memory with this model "
                             "and data.image_size; use a smaller model or data.image_size, or train.precision=bf16")
    while search.first_oom - search.largest_fit > max(1, search.largest_fit // _BISECT_PRECISION):
        middle = (search.largest_fit + search.first_oom) // 2
        if fits(middle):
            search.largest_fit = middle
        else:
            search.first_oom = middle
    return search


def with_global_batch(per_process: int, processes: int, global_batch: int) -> tuple[int, int]:
    """(batch per process, accumulation steps) giving exactly `global_batch` with batches of at
    most `per_process`: the fewest accumulation steps that do."""
    if global_batch % processes:
        raise ConfigError(f"train.global_batch_size = {global_batch} is not a multiple of the {processes} "
                          f"processes; use a multiple of {processes}")
    per_rank = global_batch // processes
    for accum in range(1, per_rank + 1):
        if per_rank % accum == 0 and per_rank // accum <= per_process:
            return per_rank // accum, accum
    return 1, per_rank  # unreachable: accum = per_rank gives batches of 1


def step_probe(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
               criterion: nn.Module, accelerator: Accelerator, example: tuple[torch.Tensor, torch.Tensor],
               channels_last: bool = False) -> Callable[[int], None]:
    """try_step(n): one training step of a copy of `model` on `n` repetitions of `example` (one image
    and its target), under the run's autocast. The copy and its optimizer state live only for
    the search, so the real model keeps its initial weights; the RNGs (dropout draws) are forked, so
    training draws the same numbers as a run given the number found."""
    device = accelerator.device
    image, target = (t.to(device) for t in example)

    def try_step(n: int) -> None:
        probe = copy.deepcopy(model).to(device).train()
        optimizer = make_optimizer(probe)
        images = image.unsqueeze(0).expand(n, *image.shape).contiguous()
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = target.unsqueeze(0).expand(n, *target.shape).contiguous()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for _ in range(2):  # the second step holds the optimizer's state as well
                    with accelerator.autocast():
                        loss = criterion(probe(images), targets)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        finally:
            del probe, optimizer, images, targets

    return try_step


def resolve_batch_size(cfg, accelerator: Accelerator, try_step: Callable[[int], None], train_samples: int) -> None:
    """Replace data.batch_size = "auto" by a number (and set train.grad_accum_steps for
    train.global_batch_size), printed in one line. Every process searches; all take the smallest."""
    processes = accelerator.num_processes
    cap = max(1, min(MAX_BATCH, math.ceil(train_samples / processes)))  # more than a process's share never fills
    if accelerator.device.type != "cuda":
        found, how = min(CPU_DEFAULT, cap), f"no CUDA device, the default {CPU_DEFAULT}" + (
            f" capped at the {cap} training images per process" if cap < CPU_DEFAULT else "")
    else:
        search = search_batch_size(try_step, cap)
        release_memory()  # training starts from an empty cache, not the probe's last blocks
        found = search.batch_size
        if processes > 1:  # the ranks must agree; the smallest GPU sets the batch
            found = int(accelerator.gather(torch.tensor([found], device=accelerator.device)).min().item())
        how = search.describe() + (f", on {torch.cuda.get_device_name(accelerator.device)}"
                                   if torch.cuda.is_available() else "")
    t = cfg.train
    line = f"batch size auto: found {found} per process ({how})"
    if t.global_batch_size:
        batch, t.grad_accum_steps = with_global_batch(found, processes, t.global_batch_size)
        line += (f"; train.global_batch_size {t.global_batch_size} = {batch} x {processes} process(es) x "
                 f"{t.grad_accum_steps} accumulation")
        found = batch
        accelerator.gradient_accumulation_steps = t.grad_accum_steps
        # The batch and the accumulation now say it all: config.toml re-runs them as a fixed batch.
        t.global_batch_size = 0
    cfg.data.batch_size = found
    accelerator.print(line)
