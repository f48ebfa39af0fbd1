"""One-process model + data + optimizer built from a config, for the sanity tools (lr finder,
overfit check). Same pieces and parameter groups as the training loop, without Accelerate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data import ImageListDataset, discover, make_loader, resolve_normalization, train_transform
from models import HeadSpec, build_classifier
from models.finetune import apply_epoch, make_plan, param_groups, prepare_for_wrapping
from trainer.optim import build_optimizer


@dataclass
class Probe:
    model: nn.Module
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device


def build_probe(cfg, device: str = "auto") -> Probe:
    torch.manual_seed(cfg.train.seed)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    splits = discover(cfg.data.root, cfg.data.val_fraction, cfg.data.seed)
    head = HeadSpec(cfg.model.head, cfg.model.head_hidden, cfg.model.head_dropout)
    built = build_classifier(cfg.model.name, len(splits.classes), head, cfg.model.pretrained, cfg.model.weights)
    plan = make_plan(built.model, built.head_name, cfg.model.freeze, cfg.train.unfreeze_at_epoch)
    prepare_for_wrapping(built.model, plan)
    apply_epoch(built.model, plan, 1)  # the first epoch's state: the head alone when unfreezing later
    d = cfg.data
    mean, std = resolve_normalization(d.normalize, built.mean, built.std, d.mean, d.std)
    dataset = ImageListDataset(splits.train, train_transform(d.augment, d.image_size, mean, std, d.crop_pct))
    loader = make_loader(dataset, d.batch_size, True, d.num_workers, dev.type == "cuda", cfg.train.seed)
    optimizer = build_optimizer(param_groups(built.model, plan, cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim)
    return Probe(built.model.to(dev), loader, optimizer, nn.CrossEntropyLoss(), dev)
