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


def train_step(accelerator: Accelerator, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer,
               scheduler, criterion, options: StepOptions, counters: StepCounters,
               epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch; returns (logits, loss), both detached. `step` counts batches from 1 in the epoch."""
    if options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        # Kept on the device: a host sync per micro-batch would stall the GPU queue.
        bad = ~torch.isfinite(loss.detach())
        counters.nonfinite = bad if counters.nonfinite is None else counters.nonfinite | bad
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # Before the optimizer step, so a NaN never reaches the weights. Every process joins this
            # reduce, so all of them stop together when any one diverged.
            if accelerator.reduce(counters.nonfinite.float(), reduction="sum").item() > 0:
                raise NonFiniteLoss(f"loss is not finite (nan or inf) at epoch {epoch}, step {step}; "
                                    "training stopped before that update, so the checkpoints already written "
                                    "are kept. Lower optim.lr, set train.grad_clip_norm (e.g. 1.0) or use "
                                    "train.precision=bf16 instead of fp16")
            counters.nonfinite = None
            if options.grad_clip_norm > 0:
                # Accelerate unscales fp16 gradients before measuring their norm.
                accelerator.clip_grad_norm_(model.parameters(), options.grad_clip_norm)
        optimizer.step()  # the prepared optimizer does nothing on non-final micro-batches
        if accelerator.sync_gradients:
            if accelerator.optimizer_step_was_skipped:
                counters.skipped_steps += 1
            else:
                scheduler.step()
                counters.optimizer_steps += 1
        optimizer.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach()
