"""Fine-tuning schedules: which parameters train in which epoch, and at what learning rate.

`model.freeze` says what may ever train: "none" (everything), "backbone" (the head only) or
"last_N" (the head and the backbone's last N units). A unit is one stage or block, named per
family: timm models say it themselves (`group_matcher(coarse=True)`: stem, then stages or
blocks); for torchvision and our models it is the first part of a parameter's name, one level
deeper inside the containers that hold a network's stages (`features.3`, `trunk_output.block4`,
`encoder.layers.encoder_layer_11`), so a ResNet has conv1, bn1, layer1..layer4.

Progressive unfreezing (`train.unfreeze_at_epoch = k`): epochs 1..k train only the head, epoch
k+1 onwards what `model.freeze` allows, the backbone at `optim.backbone_lr_mult` x the head's rate.

Why the design is what it is:
  * Everything that will *ever* train is in the optimizer from the start, in two parameter groups
    (head, backbone). The backbone group's learning rate is a pure function of the step (0 before
    the unfreeze epoch), and `requires_grad` a pure function of the epoch, so a resumed run that
    restores the step count recomputes exactly the same state; nothing about the schedule has to be
    saved.
  * Under DDP, the parameters DDP synchronizes are fixed when the model is wrapped: only those with
    requires_grad at that moment. So they are all switched on before `accelerator.prepare`, and then
    narrowed to the epoch's set. While the backbone is frozen its parameters are not in the graph,
    which DDP only tolerates with `find_unused_parameters=True` (`needs_unused_parameter_search`);
    the cost of that graph walk is paid only by runs that unfreeze progressively.
  * A frozen parameter gets no gradient (grad None), so SGD and Adam skip it entirely: no momentum
    or Adam moments build up before the unfreeze, and weight decay does not shrink frozen weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from configs.errors import ConfigError, UsageError

_LAST_N = re.compile(r"^last_(\d+)$")
# Containers whose children are a network's stages or blocks (torchvision naming).
_STAGE_CONTAINERS = {"features": 1, "trunk_output": 1, "classifier": 1, "blocks": 1, "encoder": 2}


def parse_freeze(mode: str) -> int | None:
    """None for "none" (everything trains), 0 for "backbone", N for "last_N"."""
    if mode == "none":
        return None
    if mode == "backbone":
        return 0
    match = _LAST_N.match(mode)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"model.freeze = {mode!r} is not one of 'none', 'backbone', 'last_N' with N >= 1 "
                      f"(e.g. model.freeze=last_2: the head and the backbone's last 2 stages)")


def check_finetune_config(cfg) -> None:
    """Cross-key rules of fine-tuning; called from `trainer.build.load_config`."""
    frozen_units = parse_freeze(cfg.model.freeze)
    k, epochs = cfg.train.unfreeze_at_epoch, cfg.train.epochs
    if k and frozen_units == 0:
        raise ConfigError("train.unfreeze_at_epoch needs something to unfreeze, but model.freeze = 'backbone' "
                          "keeps the backbone fixed for good: use model.freeze=none or model.freeze=last_N")
    if k and k >= epochs:
        raise ConfigError(f"train.unfreeze_at_epoch = {k} is not below train.epochs = {epochs}: the backbone "
                          f"would never train; lower it or raise train.epochs")
    if cfg.train.cache_features:
        if frozen_units != 0:
            raise ConfigError("train.cache_features needs a fixed backbone: set model.freeze=backbone "
                              f"(it is {cfg.model.freeze!r})")
        if cfg.data.augment != "none":
            raise ConfigError("train.cache_features needs the same input every epoch: set data.augment=none "
                              f"(it is {cfg.data.augment!r}; random crops and flips cannot be cached)")


# ----------------------------------------------------------------------------------------------
# Units


def _unit_key(name: str) -> str:
    parts = name.split(".")
    depth = _STAGE_CONTAINERS.get(parts[0], 0)
    return ".".join(parts[: 1 + depth]) if len(parts) > 1 + depth else parts[0]


def backbone_units(model: nn.Module, head_name: str) -> list[list[str]]:
    """The backbone's parameter names grouped into units (stages/blocks), input side first."""
    head_prefix = head_name + "."
    names = [n for n, _ in model.named_parameters() if not n.startswith(head_prefix)]
    if hasattr(model, "group_matcher"):  # timm
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        units = [[n for n in group if not n.startswith(head_prefix)] for _, group in sorted(groups.items())]
        return [u for u in units if u]
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(_unit_key(name), []).append(name)
    return list(units.values())


def unit_names(model: nn.Module, head_name: str) -> list[str]:
    """A short name per unit (the common prefix of its parameters), for messages and the log."""
    out = []
    for unit in backbone_units(model, head_name):
        first = unit[0].split(".")
        common = first[:-1]
        for name in unit[1:]:
            parts = name.split(".")
            while common and parts[: len(common)] != common:
                common = common[:-1]
        out.append(".".join(common) or first[0])
    return out


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class FinetunePlan:
    head: tuple[str, ...]           # parameter names of the head: always trained
    backbone: tuple[str, ...]       # backbone parameters that train at some point
    unfreeze_at_epoch: int = 0      # 0: the backbone part trains from epoch 1

    def backbone_trains(self, epoch: int) -> bool:
        return epoch > self.unfreeze_at_epoch

    def trainable_at(self, epoch: int) -> set[str]:
        return set(self.head) | (set(self.backbone) if self.backbone_trains(epoch) else set())


def make_plan(model: nn.Module, head_name: str, freeze: str, unfreeze_at_epoch: int = 0) -> FinetunePlan:
    head_prefix = head_name + "."
    all_names = [n for n, _ in model.named_parameters()]
    head = tuple(n for n in all_names if n.startswith(head_prefix))
    if not head:
        raise UsageError(f"no parameters under the head '{head_name}'; cannot fine-tune this model")
    frozen_units = parse_freeze(freeze)
    if frozen_units is None:
        backbone = tuple(n for n in all_names if not n.startswith(head_prefix))
    else:
        units = backbone_units(model, head_name)
        if frozen_units > len(units):
            raise UsageError(f"model.freeze = {freeze!r} asks for {frozen_units} units but this backbone has "
                             f"{len(units)} ({', '.join(unit_names(model, head_name))}); use at most "
                             f"last_{len(units)} or model.freeze=none")
        chosen = {n for unit in units[len(units) - frozen_units:] for n in unit} if frozen_units else set()
        backbone = tuple(n for n in all_names if n in chosen)
    return FinetunePlan(head, backbone, unfreeze_at_epoch)


def prepare_for_wrapping(model: nn.Module, plan: FinetunePlan) -> None:
    """Before `accelerator.prepare`: requires_grad on for everything that trains at some point,
    so DDP registers it; off for the rest, so DDP and the optimizer never see it."""
    ever = set(plan.head) | set(plan.backbone)
    for name, param in model.named_parameters():
        param.requires_grad = name in ever


def apply_epoch(model: nn.Module, plan: FinetunePlan, epoch: int) -> None:
    """At the start of `epoch` (1-based): requires_grad exactly for that epoch's trainable set.
    Call it on the unwrapped model; frozen BatchNorm then stays in eval via `set_train_mode`."""
    trainable = plan.trainable_at(epoch)
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable


def param_groups(model: nn.Module, plan: FinetunePlan, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Head first, then the backbone (if any part of it ever trains), each with its own lr."""
    params = dict(model.named_parameters())
    groups = [{"name": "head", "params": [params[n] for n in plan.head], "lr": lr}]
    if plan.backbone:
        groups.append({"name": "backbone", "params": [params[n] for n in plan.backbone],
                       "lr": lr * backbone_lr_mult})
    return groups


def needs_unused_parameter_search(cfg) -> bool:
    """DDP must look for parameters outside the graph when requires_grad changes during the run."""
    return cfg.train.unfreeze_at_epoch > 0


__all__ = ["FinetunePlan", "apply_epoch", "backbone_units", "check_finetune_config",
           "make_plan", "needs_unused_parameter_search", "param_groups", "parse_freeze", "prepare_for_wrapping",
           "unit_names"]
