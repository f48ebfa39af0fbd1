"""The Accelerator for this run: device, processes and precision, decided by how it was launched.

`python launch/train.py` runs one process; `accelerate launch` (flags or an `accelerate config`
file) or `torchrun` decide the number of processes and machines; `train.precision` overrides
`--mixed_precision` when it is not "auto".
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from trainer.config import Config
from trainer.tracking import make_wandb_tracker


def make_accelerator(cfg: Config) -> Accelerator:
    precision = None if cfg.train.precision == "auto" else cfg.train.precision
    # Accelerate takes its trackers at construction; the W&B run itself starts (main process only)
    # in RunTracking.start, once the run folder exists.
    tracker = make_wandb_tracker(cfg)
    log_with = [tracker] if tracker is not None else None
    # Without cpu=True, Accelerate starts N independent single-process runs on a GPU-less machine
    # instead of one DDP group over gloo.
    from models.finetune import needs_unused_parameter_search

    handlers = []
    if needs_unused_parameter_search(cfg):  # frozen-then-unfrozen parameters are outside the graph at first
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with=log_with,
                       kwargs_handlers=handlers)


def describe(accelerator: Accelerator, batch_size: int, grad_accum_steps: int = 1) -> dict:
    """Facts about the run's hardware recorded in the log and in checkpoint metadata."""
    return {
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "precision": accelerator.mixed_precision,
        "batch_size": batch_size,
        "grad_accum_steps": grad_accum_steps,
        "global_batch_size": batch_size * accelerator.num_processes * grad_accum_steps,
    }

