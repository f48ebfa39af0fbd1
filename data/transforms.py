"""Train and eval transform presets on uint8 image tensors (torchvision.transforms.v2).

Images are decoded to uint8 CHW tensors and stay uint8 through the geometric ops (cheaper than
float); conversion to float and normalization come last.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from models.build import IMAGENET_MEAN, IMAGENET_STD


def resolve_normalization(normalize: str, backbone_mean, backbone_std, mean=(), std=()) -> tuple[tuple, tuple]:
    if normalize == "custom":
        return tuple(mean), tuple(std)
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(backbone_mean), tuple(backbone_std)


def _finish(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def eval_transform(image_size: int, mean, std, crop_pct: float = 0.875) -> v2.Compose:
    # Resize the short side to image_size / crop_pct (256 for 224), then take the center.
    resize = max(image_size, round(image_size / crop_pct))
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *_finish(mean, std)])


def train_transform(preset: str, image_size: int, mean, std, crop_pct: float = 0.875) -> v2.Compose:
    if preset == "none":
        return eval_transform(image_size, mean, std, crop_pct)
    if preset == "standard":
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "crop":  # for images where left/right matters (digits, text)
        ops = [v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True)]
    else:
        raise ValueError(f"unknown augment preset {preset!r}")
    return v2.Compose([*ops, *_finish(mean, std)])
