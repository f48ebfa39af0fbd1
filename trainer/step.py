"""One training step: forward under autocast, backward, accumulate, clip, step, count.

The order matters and is the same on every device and process count:
  backward (Accelerate scales fp16 losses and divides by the accumulation steps)
  -> on the last micro-batch of an accumulation: agree across processes that every loss was
     finite, unscale + clip the gradients, step the optimizer (the fp16 scaler may skip it)
  -> step the learning-rate schedule only when the optimizer really stepped.
The schedule is not passed to `accelerator.prepare` (see trainer/optim.py), so it advances once
per optimizer step whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from configs.errors import TrainingFailed


class NonFiniteLoss(TrainingFailed):
    """Training diverged. Raised on every process at the same step, so no process waits in a collective."""


@dataclass
class StepOptions:
    grad_clip_norm: float = 0.0  # 0: off
    channels_last: bool = False


@dataclass
class StepCounters:
    """Per-epoch bookkeeping of optimizer steps (not micro-batches)."""

    optimizer_steps: int = 0
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped because gradients overflowed
    nonfinite: torch.Tensor | None = field(default=None, repr=False)  # any non-finite micro-batch loss since the last step


@dataclass
class StepParts:
    """What one training step works with, all prepared by Accelerate."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    options: StepOptions


def train_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, counters: StepCounters,
               where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch; returns (logits, loss), both detached. `where` ("epoch 2, step 7") names the
    step in the error raised when the loss is not finite."""
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    if parts.options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = parts.criterion(logits, labels)
        # Kept on the device: a host sync per micro-batch would stall the GPU queue.
        bad = ~torch.isfinite(loss.detach())
        counters.nonfinite = bad if counters.nonfinite is None else counters.nonfinite | bad
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # Before the optimizer step, so a NaN never reaches the weights. Every process joins this
            # reduce, so all of them stop together when any one diverged.
            if accelerator.reduce(counters.nonfinite.float(), reduction="sum").item() > 0:
                raise NonFiniteLoss(f"loss is not finite (nan or inf) at {where}; "
                                    "training stopped before that update, so the checkpoints already written "
                                    "are kept. Lower optim.lr, set train.grad_clip_norm (e.g. 1.0) or use "
                                    "train.precision=bf16 instead of fp16")
            counters.nonfinite = None
            if parts.options.grad_clip_norm > 0:
                # Accelerate unscales fp16 gradients before measuring their norm.
                accelerator.clip_grad_norm_(model.parameters(), parts.options.grad_clip_norm)
        optimizer.step()  # the prepared optimizer does nothing on non-final micro-batches
        if accelerator.sync_gradients:
            if accelerator.optimizer_step_was_skipped:
                counters.skipped_steps += 1
            else:
                parts.scheduler.step()
                counters.optimizer_steps += 1
        optimizer.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach()
