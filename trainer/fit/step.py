"""One training step: forward under autocast, backward, accumulate, clip, step, count.

The order matters and is the same on every device and process count:
  backward (Accelerate scales fp16 losses and divides by the accumulation steps)
  -> on the last micro-batch of an accumulation: unscale + clip the gradients, step the optimizer
     (the fp16 scaler may skip it)
  -> step the learning-rate schedule, and average the weights into the EMA (`train.ema_decay`),
     only when the optimizer really stepped.
The schedule is not passed to `accelerator.prepare` (see trainer/assemble/optim.py), so it advances once
per optimizer step whatever the number of processes.

Nothing here waits for the device: a step only queues work, so the GPU never idles while the
host catches up. (fp16 is the exception: torch's GradScaler reads its overflow flag on the host
every optimizer step; bf16 and fp32 have no scaler.) Whether every loss was finite is recorded on
the device and checked by `raise_if_nonfinite` at log intervals and before every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from configs.errors import TrainingFailed
from trainer.fit.ema import WeightEma


class NonFiniteLoss(TrainingFailed):
    """Training diverged. Raised on every process at the same point, so no process waits in a collective.

    What is guaranteed: the check runs every `train.log_every_steps` batches, at the end of every
    epoch and before every checkpoint, so no checkpoint or model file ever holds weights updated
    from a non-finite loss, and training stops at most `log_every_steps` batches after the first
    one. The message names the step where the first non-finite loss happened."""


@dataclass
class StepOptions:
    grad_clip_norm: float = 0.0  # 0: off
    channels_last: bool = False


@dataclass
class StepCounters:
    """Per-epoch bookkeeping of optimizer steps (not micro-batches)."""

    optimizer_steps: int = 0
    skipped_steps: int = 0  # fp16 steps the gradient scaler skipped because gradients overflowed
    # The epoch's position (batch index + 1) of the first non-finite micro-batch loss, 0 if none; on the device.
    first_nonfinite: torch.Tensor | None = field(default=None, repr=False)

    def note_loss(self, loss: torch.Tensor, position: int) -> None:
        """Remember, on the device, the first batch whose loss is not finite (no host sync)."""
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.zeros((), dtype=torch.int64, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self.first_nonfinite == 0)
        # torch.full passes the position as a kernel argument: no host-to-device copy, no sync.
        here = torch.full((), position + 1, dtype=torch.int64, device=loss.device)
        self.first_nonfinite = torch.where(bad, here, self.first_nonfinite)

    def raise_if_nonfinite(self, accelerator: Accelerator, where: str) -> None:
        """A collective: every process calls it at the same batch, and all raise together.
        `where` ("epoch 2") is completed with the step of the first non-finite loss on any process."""
        if self.first_nonfinite is None:
            return
        none = torch.iinfo(torch.int64).min
        # The earliest bad position over processes, as the max of the negated positions.
        flagged = torch.where(self.first_nonfinite > 0, -self.first_nonfinite, torch.full_like(self.first_nonfinite, none))
        earliest = int(accelerator.reduce(flagged, reduction="max").item())
        if earliest != none:
            raise NonFiniteLoss(f"loss is not finite (nan or inf) at {where}, step {-earliest}; training stopped "
                                "before any checkpoint saw it, so the checkpoints already written are kept. Lower "
                                "optim.lr, set train.grad_clip_norm (e.g. 1.0) or use train.precision=bf16 "
                                "instead of fp16")


@dataclass
class StepParts:
    """What one training step works with, all prepared by Accelerate."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    options: StepOptions
    ema: WeightEma | None = None  # averaged after each optimizer step that really stepped


def train_step(parts: StepParts, images: torch.Tensor, labels: torch.Tensor, counters: StepCounters,
               position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch, the epoch's `position`-th (from 0); returns (logits, loss), both detached."""
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    if parts.options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = parts.criterion(logits, labels)
        counters.note_loss(loss, position)  # on the device: a host sync per step would stall the GPU queue
        accelerator.backward(loss)
        if accelerator.sync_gradients:
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
                if parts.ema is not None:
                    parts.ema.update()
        optimizer.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach()
