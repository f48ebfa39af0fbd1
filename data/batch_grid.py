"""A captioned grid of augmented training samples, as one PNG (the seeds' batch view)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.audit_training import prepare_training_data
from data.balance import BalancedSampler
from data.dataset import ImageListDataset
from data.folders import discover
from data.transforms import batch_mixer, train_transform

CAPTION_HEIGHT = 14


def _caption(label: torch.Tensor, classes: list[str]) -> str:
    if label.ndim == 0:
        return classes[int(label)]
    weights, indices = label.topk(min(2, len(classes)))  # mixed: the two strongest classes
    return " / ".join(f"{classes[i]} {w:.2f}" for w, i in zip(weights.tolist(), indices.tolist()) if w > 0.005)


def augmented_grid(cfg, out: str | Path, count: int = 16, tile: int = 128) -> Path:
    d = cfg.data
    splits = discover(d.root, d.val_fraction, d.seed)
    splits = prepare_training_data(splits, d, True, print).splits
    # Identity normalization: the grid shows pixels as augmented, before mean/std are applied.
    transform = train_transform(d.augment, d.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), d.crop_pct, d.augment_ops)
    dataset = ImageListDataset(splits.train, transform, max_pixels=d.max_image_pixels)
    labels = [label for _, label in splits.train]
    if d.sampler == "balanced":
        order = list(BalancedSampler(labels, seed=cfg.train.seed))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
    torch.manual_seed(cfg.train.seed)  # the augmentations' own randomness
    picked = [dataset[i] for i in order[:count]]
    images = torch.stack([image for image, _ in picked])
    targets = torch.tensor([label for _, label in picked])
    mixer = batch_mixer(len(splits.classes), d.mixup_alpha, d.cutmix_alpha)
    if mixer is not None:
        images, targets = mixer(images, targets)

    columns = math.ceil(math.sqrt(len(picked)))
    rows = math.ceil(len(picked) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + CAPTION_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, target) in enumerate(zip(images, targets)):
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        # Nearest neighbour keeps tiny training images readable instead of blurring them.
        thumb = Image.fromarray(np.ascontiguousarray(pixels)).resize((tile, tile), Image.NEAREST)
        x, y = (i % columns) * tile, (i // columns) * (tile + CAPTION_HEIGHT)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + tile + 1), _caption(target, splits.classes)[: tile // 6], fill="black")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
