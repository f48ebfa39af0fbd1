"""Checks before a long run, on exactly what training would see: the LR finder, the one-batch
overfit check and the grid of augmented training samples.

Each builds the run with `trainer.assemble.run_parts.build_run` (same split, audit, normalization, augmentation,
sampler, model, parameter groups and first batches as `trainer.fit.loop.train` for the same config),
in one process, without W&B and without writing to the run folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import set_seed

from configs.schema import Config
from models import set_train_mode
from trainer.reporting import plots
from trainer.assemble.run_parts import RunParts, build_run
from trainer.assemble.accelerator import make_accelerator
from trainer.task.task import task_for


@dataclass
class Prepared:
    """A run's parts with the model and optimizer prepared for one process."""

    parts: RunParts
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches in the trainer's order: epoch 1 from its start, then epoch 2, ..."""
        loader = self.parts.train_loader
        for epoch in range(1, 1_000_000):
            loader.start_epoch(epoch)
            yield from loader

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        with self.accelerator.autocast():
            loss = self.parts.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()
        return loss.item()


def prepare(cfg: Config) -> Prepared:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)  # as the trainer does: the same initial weights
    parts = build_run(cfg, accelerator)
    parts.enter_epoch(1)  # the first epoch's trainable set: the head alone when unfreezing later
    model, optimizer = accelerator.prepare(parts.model, parts.optimizer)
    # Each group at its configured rate (the schedule's warm-up would scale them): head optim.lr,
    # backbone optim.lr x optim.backbone_lr_mult (x optim.layer_decay^depth per layer).
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    set_train_mode(parts.model)
    return Prepared(parts, accelerator, model, optimizer)


# ----------------------------------------------------------------------------------------------
# LR finder


@dataclass
class LrSweep:
    lrs: list[float]
    losses: list[float]  # smoothed, bias-corrected
    suggested: float
    ratios: list[float]  # each group's rate relative to the head's


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The learning rate where the smoothed loss falls fastest (per decade of lr)."""
    if len(lrs) < 3:
        return lrs[0]
    logs = [math.log10(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(lrs) - 1)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def lr_sweep(cfg: Config, start: float, end: float, steps: int) -> LrSweep:
    """An exponential sweep of the base rate from `start` to `end` over `steps` training steps; every
    parameter group is scaled by the same factor, so each group's ratio to the head (backbone_lr_mult,
    layer_decay) is kept."""
    run = prepare(cfg)
    ratios = [g["lr"] / cfg.optim.lr for g in run.optimizer.param_groups]
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches = run.batches()
    for step in range(steps):
        lr = start * (end / start) ** (step / (steps - 1))
        for group, ratio in zip(run.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        loss = run.step(*next(batches))
        # Exponential moving average with bias correction, as in fastai's and Leslie Smith's finders.
        smooth = 0.9 * smooth + 0.1 * loss
        value = smooth / (1 - 0.9 ** (step + 1))
        if not math.isfinite(value) or value > 4 * best:
            break  # diverged: the rest of the curve says nothing
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    if not lrs:
        lrs, losses = [start], [math.nan]
    return LrSweep(lrs, losses, suggest(lrs, losses), ratios)


def plot_lr_sweep(sweep: LrSweep, path: str | Path) -> Path:
    return plots.lr_curve(path, sweep.lrs, sweep.losses, sweep.suggested)


# ----------------------------------------------------------------------------------------------
# Overfit check


@dataclass
class OverfitResult:
    images: int
    first_loss: float
    final_loss: float
    accuracy: float
    losses: dict[int, float]  # step -> loss, every 20 steps


def overfit_one_batch(cfg: Config, steps: int) -> OverfitResult:
    """Train `steps` steps on the trainer's first batch; then its loss and accuracy in eval mode."""
    run = prepare(cfg)
    images, labels = next(run.batches())
    losses = {}
    for step in range(1, steps + 1):
        loss = run.step(images, labels)
        if step == 1 or step % 20 == 0:
            losses[step] = loss
    run.model.eval()  # the final check without dropout, as the batch would be seen at evaluation
    with torch.no_grad(), run.accelerator.autocast():
        logits = run.model(images).float()
    final = run.parts.criterion(logits, labels).item()
    accuracy = task_for(cfg).agreement(logits, labels)  # top-1, or (multi-label) every class decision at 0.5
    return OverfitResult(len(labels), losses[1], final, accuracy, losses)


# ----------------------------------------------------------------------------------------------
# Batch grid


def batch_grid(cfg: Config, out: str | Path, count: int = 16) -> Path:
    """The first `count` training samples as the model sees them (augmented, mixed), normalization
    undone for display, captioned with their (mixed) labels."""
    run = prepare(cfg)
    images, targets = [], []
    for batch_images, batch_labels in run.batches():
        images.append(batch_images.float().cpu())
        targets.append(batch_labels.cpu())
        if sum(len(i) for i in images) >= count:
            break
    images, targets = torch.cat(images)[:count], torch.cat(targets)[:count]
    pre = run.parts.data.preprocessing
    pixels = plots.denormalize(images.numpy(), pre.mean, pre.std)
    classes = run.parts.data.classes
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    return plots.image_grid(out, pixels, [_caption(t, classes) for t in targets],
                            title=f"{cfg.data.augment} + {len(cfg.data.augment_ops)} extra op(s), first batch")


def _caption(label: torch.Tensor, classes: list[str]) -> str:
    if label.ndim == 0:
        return classes[int(label)]
    weights, indices = label.topk(min(2, len(classes)))  # mixed: the two strongest classes
    return " / ".join(f"{classes[i]} {w:.2f}" for w, i in zip(weights.tolist(), indices.tolist()) if w > 0.005)


__all__ = ["LrSweep", "OverfitResult", "batch_grid", "lr_sweep", "overfit_one_batch", "plot_lr_sweep", "suggest"]
