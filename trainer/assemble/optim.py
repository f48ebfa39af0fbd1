"""Optimizers and per-step learning-rate schedules.

Every schedule is a per-step factor (`lr_factor`), turned into one LambdaLR per parameter group
by `build_scheduler` and stepped once per optimizer step. The scheduler
is deliberately not passed through `accelerator.prepare`: Accelerate would step a prepared
scheduler once per process, so the curve would depend on the process count.
"""

from __future__ import annotations

import math

import torch

from configs.errors import UsageError
from configs.schema import OptimConfig
from models.finetune import FinetunePlan, group_part


def build_optimizer(params: list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """`params`: trainable tensors, or parameter groups (dicts) with their own `lr`."""
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer.register_load_state_dict_pre_hook(_check_saved_layout)
    return optimizer


def _layout(groups: list[dict]) -> list[tuple[str, int]]:
    return [(group.get("name", "?"), len(group["params"])) for group in groups]


def _check_saved_layout(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Refuse, in one line that says what decides it, a saved state whose parameter groups differ."""
    saved, now = _layout(state_dict["param_groups"]), _layout(optimizer.param_groups)
    if saved == now:
        return

    def names(layout: list[tuple[str, int]]) -> str:
        shown = ", ".join(f"{name} ({count})" for name, count in layout[:4])
        return shown + (f" and {len(layout) - 4} more" if len(layout) > 4 else "")

    raise UsageError(f"cannot resume: the checkpoint's optimizer has {len(saved)} parameter groups ({names(saved)}) "
                     f"but this config makes {len(now)} ({names(now)}); model.freeze, model.bn, optim.layer_decay "
                     f"and optim.no_decay_norm_bias (with optim.weight_decay > 0) decide them: set them as the run "
                     f"had (a run saved before optim.no_decay_norm_bias existed: optim.no_decay_norm_bias=false)")


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps: a linear warm-up of
    optim.warmup_epochs (whatever the schedule, as timm's), then the schedule."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.scheduler == "step":
        # StepLR(step_size epochs, gamma), as in the hymenoptera seed, but per optimizer step.
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    if cfg.scheduler == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, plan: FinetunePlan,
                             steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (`trainer.assemble.optim.lr_factor`) for every group, times 0 for the backbone group
    before its unfreeze epoch. A function of the step count only: resuming restores it exactly."""
    total = steps_per_epoch * epochs

    def head(step: int) -> float:
        return lr_factor(step, optim_cfg, steps_per_epoch, total)

    def backbone(step: int) -> float:
        epoch = step // steps_per_epoch + 1  # the epoch this step belongs to
        return head(step) if plan.backbone_trains(epoch) else 0.0

    lambdas = [backbone if group_part(group) == "backbone" else head for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
