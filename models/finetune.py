"""Fine-tuning schedules: which parameters train in which epoch, and at what learning rate.

`model.freeze` says what may ever train: "none" (everything), "backbone" (the head only) or
"last_N" (the head and the backbone's last N units). A unit is one stage or block, named per
family: timm models say it themselves (`group_matcher(coarse=True)`: stem, then stages or
blocks); for torchvision and our models it is the first part of a parameter's name, one level
deeper inside the containers that hold a network's stages (`features.3`, `trunk_output.block4`,
`encoder.layers.encoder_layer_11`), so a ResNet has conv1, bn1, layer1..layer4.

Progressive unfreezing (`train.unfreeze_at_epoch = k`): epochs 1..k train only the head, epoch
k+1 onwards what `model.freeze` allows, the backbone at `optim.backbone_lr_mult` x the head's rate.

`model.bn = "frozen"` takes every BatchNorm's affine parameters out of the plan: they never get a
gradient, and `models.build.set_train_mode` keeps those layers in eval, so their statistics stay.

Parameter groups (`param_groups`, `GroupRules`): the head at optim.lr, the backbone at
x backbone_lr_mult; with optim.layer_decay each backbone layer i of L (input side first) at a
further x layer_decay^(L - i) (BEiT / timm's `param_groups_layer_decay`); with weight decay and
optim.no_decay_norm_bias, biases, 1-D parameters and timm's `no_weight_decay()` names in groups of
their own with weight_decay 0 (timm's `param_groups_weight_decay`). With the defaults (no layer
decay, no weight decay) the groups are exactly head and backbone, as before those keys existed, so
older checkpoints resume into the same layout.

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

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from configs.errors import ConfigError, UsageError

if TYPE_CHECKING:  # torch at run time only where a model is at hand: load_config checks the config without it
    from torch import nn

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
    """Cross-key rules of fine-tuning; called from `trainer.assemble.run_config.load_config`."""
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
    head_name: str = ""             # dotted path of the head module

    def backbone_trains(self, epoch: int) -> bool:
        return epoch > self.unfreeze_at_epoch

    def trainable_at(self, epoch: int) -> set[str]:
        return set(self.head) | (set(self.backbone) if self.backbone_trains(epoch) else set())


def batchnorm_parameters(model: nn.Module) -> set[str]:
    """Names of every BatchNorm layer's affine parameters (timm's BatchNormAct2d included)."""
    from torch import nn

    return {f"{path}.{name}" if path else name for path, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, _ in module.named_parameters(recurse=False)}


def batchnorm_trains(model: nn.Module, plan: FinetunePlan) -> bool:
    """Whether some BatchNorm layer trains at some point of the plan (and so uses batch statistics)."""
    return bool(batchnorm_parameters(model) & (set(plan.head) | set(plan.backbone)))


def make_plan(model: nn.Module, head_name: str, freeze: str, unfreeze_at_epoch: int = 0,
              bn: str = "train") -> FinetunePlan:
    """`bn = "frozen"`: no BatchNorm parameter is ever in the plan (see the module docstring)."""
    head_prefix = head_name + "."
    fixed = batchnorm_parameters(model) if bn == "frozen" else set()
    all_names = [n for n, _ in model.named_parameters() if n not in fixed]
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
    return FinetunePlan(head, backbone, unfreeze_at_epoch, head_name)


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


@dataclass(frozen=True)
class GroupRules:
    """What splits the head and backbone groups further (the defaults split nothing)."""

    layer_decay: float = 0.0        # optim.layer_decay; 0: off
    weight_decay: float = 0.0       # optim.weight_decay
    no_decay_norm_bias: bool = True  # optim.no_decay_norm_bias

    @classmethod
    def of(cls, optim) -> "GroupRules":
        return cls(optim.layer_decay, optim.weight_decay, optim.no_decay_norm_bias)

    @property
    def splits_decay(self) -> bool:
        return self.weight_decay > 0 and self.no_decay_norm_bias


def backbone_layers(model: nn.Module, plan: FinetunePlan) -> dict[str, int]:
    """Each backbone parameter's layer, 0 on the input side. timm models: their fine group_matcher,
    as timm's own layer decay uses; the others: the units of model.freeze (top-level children, one
    level deeper inside stage containers), so a torchvision ResNet has conv1, bn1, layer1..layer4."""
    head_prefix = plan.head_name + "."
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        ranks = {layer: i for i, layer in enumerate(sorted({ids[n] for n in ids if not n.startswith(head_prefix)}))}
        return {n: ranks[layer] for n, layer in ids.items() if not n.startswith(head_prefix)}
    return {n: i for i, unit in enumerate(backbone_units(model, plan.head_name)) for n in unit}


def no_weight_decay_parameters(model: nn.Module) -> set[str]:
    """timm's rule: biases and 1-D parameters (norm weights among them), plus the names (or patterns)
    the model's own `no_weight_decay()` lists, such as a ViT's position embedding and class token."""
    patterns = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return {n for n, p in model.named_parameters()
            if p.ndim <= 1 or n.endswith(".bias") or any(fnmatch.fnmatch(n, pat) for pat in patterns)}


def param_groups(model: nn.Module, plan: FinetunePlan, lr: float, backbone_lr_mult: float,
                 rules: GroupRules = GroupRules()) -> list[dict]:
    """The head's groups first (full lr), then the backbone's (if any part of it ever trains), each
    with its own lr; only parameters of the plan, so frozen ones stay out. Group names say the part
    first ("head", "backbone.layer_3.no_decay"): the schedule zeroes the backbone's until it unfreezes."""
    params = dict(model.named_parameters())
    layers = backbone_layers(model, plan) if rules.layer_decay and plan.backbone else {}
    depth = max(layers.values(), default=-1) + 1
    no_decay = no_weight_decay_parameters(model) if rules.splits_decay else set()
    groups: dict[str, dict] = {}
    for part, names, part_lr in (("head", plan.head, lr), ("backbone", plan.backbone, lr * backbone_lr_mult)):
        for n in names:
            name, group_lr = part, part_lr
            if n in layers:
                name += f".layer_{layers[n]}"
                group_lr *= rules.layer_decay ** (depth - layers[n])  # the last layer x decay, the head x 1
            if n in no_decay:
                name += ".no_decay"
            group = groups.setdefault(name, {"name": name, "params": [], "lr": group_lr})
            if n in no_decay:
                group["weight_decay"] = 0.0
            group["params"].append(params[n])
    return list(groups.values())


def group_part(group: dict) -> str:
    """"head" or "backbone": which part of the plan a parameter group belongs to."""
    return group.get("name", "head").split(".")[0]


def describe_groups(groups: list[dict]) -> str:
    """One line for the start of a run: how many groups, their learning rates, what decays."""
    lrs = sorted({g["lr"] for g in groups})
    rates = f"lr {lrs[0]:.3g}" if len(lrs) == 1 else f"lr {lrs[0]:.3g} .. {lrs[-1]:.3g}"
    tensors = sum(len(g["params"]) for g in groups)
    exempt = sum(len(g["params"]) for g in groups if g["name"].endswith(".no_decay"))
    decay = f"; no weight decay on {exempt} of {tensors} tensors (biases, norms, 1-D)" if exempt else ""
    return f"optimizer: {len(groups)} parameter groups, {rates} (head {groups[0]['lr']:.3g}){decay}"


def needs_unused_parameter_search(cfg) -> bool:
    """DDP must look for parameters outside the graph when requires_grad changes during the run."""
    return cfg.train.unfreeze_at_epoch > 0


__all__ = ["FinetunePlan", "GroupRules", "apply_epoch", "backbone_layers", "backbone_units", "batchnorm_parameters",
           "batchnorm_trains", "check_finetune_config", "describe_groups", "group_part", "make_plan",
           "needs_unused_parameter_search", "no_weight_decay_parameters", "param_groups", "parse_freeze",
           "prepare_for_wrapping", "unit_names"]
