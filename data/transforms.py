"""Train and eval transforms on uint8 image tensors (torchvision.transforms.v2), built from config.

A training pipeline is a preset (`data.augment`) plus extra named ops (`data.augment_ops`), each
written `name` or `name(key=value, ...)`, e.g. `"color_jitter(brightness=0.2, contrast=0.2)"`.
Every op is a thin use of a torchvision.transforms.v2 class. Images stay uint8 through the
geometric and color ops (cheaper than float); conversion to float and normalization come last,
then random erasing (which works on the normalized tensor, as in timm).

Presets reproduce the seeds' pipelines:
  standard        RandomResizedCrop + flip; eval Resize(size/crop_pct) + CenterCrop (hymenoptera, puppies)
  crop            RandomResizedCrop(scale 0.7-1) without flip (digits, text: left/right matters)
  stretch         Resize to a square + flip; eval Resize to a square (cats vs dogs, AlexNet)
  square          pad to square + resize + ColorJitter(brightness=0.01) + RandomAffine(10, shear=45);
                  eval pad + resize (campus buildings)
  randaugment     standard + RandAugment
  trivialaugment  standard + TrivialAugmentWide
  none            the eval transform (no augmentation)
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from configs.schema import IMAGENET_MEAN, IMAGENET_STD
from configs.errors import UsageError

PRESETS = ("standard", "crop", "stretch", "square", "randaugment", "trivialaugment", "none")


def resolve_normalization(normalize: str, backbone_mean, backbone_std, mean=(), std=()) -> tuple[tuple, tuple]:
    """`dataset` statistics come in as mean/std, like `custom` ones (computed by data.stats)."""
    if normalize in ("custom", "dataset"):
        return tuple(mean), tuple(std)
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(backbone_mean), tuple(backbone_std)


class PadToSquare:
    """Pad the short side (both edges equally) so the image is square, as the campus seed's
    PadImage does: the whole building stays in view instead of being cropped away."""

    def __init__(self, fill: int = 0):
        self.fill = fill

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height == width:
            return image
        extra = abs(height - width)
        before, after = extra // 2, extra - extra // 2
        padding = [0, before, 0, after] if width > height else [before, 0, after, 0]  # left, top, right, bottom
        return F.pad(image, padding, fill=self.fill)

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


# name -> builder(image_size, **kwargs); kwargs are the op's own torchvision arguments.
OPS: dict[str, Callable] = {
    "pad_to_square": lambda size, fill=0: PadToSquare(fill),
    "resize_square": lambda size: v2.Resize((size, size), antialias=True),
    "random_resized_crop": lambda size, **kw: v2.RandomResizedCrop(size, antialias=True, **kw),
    "hflip": lambda size, p=0.5: v2.RandomHorizontalFlip(p),
    "vflip": lambda size, p=0.5: v2.RandomVerticalFlip(p),
    "rotation": lambda size, degrees=15, **kw: v2.RandomRotation(degrees, **kw),
    "color_jitter": lambda size, **kw: v2.ColorJitter(**kw),
    "grayscale": lambda size, p=0.1: v2.RandomGrayscale(p),
    "random_affine": lambda size, degrees=10, **kw: v2.RandomAffine(degrees, **kw),
    "randaugment": lambda size, **kw: v2.RandAugment(**kw),
    "trivialaugment": lambda size, **kw: v2.TrivialAugmentWide(**kw),
    "autoaugment": lambda size, **kw: v2.AutoAugment(**kw),
    "gaussian_blur": lambda size, kernel_size=3, **kw: v2.GaussianBlur(kernel_size, **kw),
    "random_erasing": lambda size, **kw: v2.RandomErasing(**kw),
}
AFTER_NORMALIZE = ("random_erasing",)

_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$", re.S)


def parse_op(spec: str) -> tuple[str, dict]:
    """`"color_jitter(brightness=0.2, hue=0.05)"` -> ("color_jitter", {"brightness": 0.2, "hue": 0.05})."""
    match = _SPEC.match(spec)
    if not match:
        raise UsageError(f"data.augment_ops entry {spec!r} must look like name or name(key=value, ...), "
                         f"e.g. \"color_jitter(brightness=0.2)\"")
    name, args = match.group(1), match.group(2)
    if name not in OPS:
        close = difflib.get_close_matches(name, list(OPS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"unknown augmentation '{name}' in data.augment_ops{hint} (known: {', '.join(OPS)})")
    kwargs = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            if call.args:
                raise ValueError("positional arguments")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as e:
            raise UsageError(f"data.augment_ops entry {spec!r}: arguments must be key=value with literal "
                             f"values ({e})") from None
    return name, kwargs


def build_op(spec: str, image_size: int):
    name, kwargs = parse_op(spec)
    try:
        return name, OPS[name](image_size, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"data.augment_ops entry {spec!r}: {e}") from None


def check_augment_ops(specs: list[str], image_size: int) -> None:
    """Raise a UsageError naming the first entry of data.augment_ops that does not build."""
    for spec in specs:
        build_op(spec, image_size)


def _finish(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


# The eval geometry of each preset, in timm's crop_mode names: "center" resizes the short side to
# image_size / crop_pct and takes the center; "squash" resizes to a square, ignoring the aspect
# ratio; "border" pads to a square first (timm pads with the mean; we pad with black, as the
# campus seed does).
CROP_MODES = {"stretch": "squash", "square": "border"}


def crop_mode_of(preset: str) -> str:
    return CROP_MODES.get(preset, "center")


def _eval_geometry(crop_mode: str, image_size: int, crop_pct: float) -> list:
    if crop_mode == "border":
        return [PadToSquare(), v2.Resize((image_size, image_size), antialias=True)]
    if crop_mode == "squash":
        return [v2.Resize((image_size, image_size), antialias=True)]
    # Resize the short side to image_size / crop_pct (256 for 224), then take the center.
    resize = max(image_size, round(image_size / crop_pct))
    return [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]


@dataclass(frozen=True)
class Preprocessing:
    """What a trained model expects to see: the one definition of the eval transform.

    Validation during training, predict.py, evaluate.py and TTA all build their transform from
    this, and every checkpoint records it, so a checkpoint evaluated later sees exactly the
    pixels its validation score was measured on."""

    image_size: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_mode: str = "center"  # center | squash | border (timm's names)

    def eval_transform(self) -> v2.Compose:
        return v2.Compose([*_eval_geometry(self.crop_mode, self.image_size, self.crop_pct),
                           *_finish(self.mean, self.std)])

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "mean": list(self.mean),
                "std": list(self.std), "crop_mode": self.crop_mode}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        # Checkpoints written before crop_mode was recorded were always evaluated center-cropped.
        return cls(int(d["image_size"]), float(d["crop_pct"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("crop_mode", "center"))


_PRESET_OPS = {
    "standard": ["random_resized_crop", "hflip"],
    "crop": ["random_resized_crop(scale=(0.7, 1.0), ratio=(0.9, 1.1))"],
    "stretch": ["resize_square", "hflip"],
    "square": ["pad_to_square", "resize_square", "color_jitter(brightness=0.01)",
               "random_affine(degrees=10, shear=45)"],
    "randaugment": ["random_resized_crop", "hflip", "randaugment"],
    "trivialaugment": ["random_resized_crop", "hflip", "trivialaugment"],
}


def train_transform(preset: str, image_size: int, mean, std, crop_pct: float = 0.875,
                    extra_ops: list[str] = ()) -> v2.Compose:
    if preset not in PRESETS:
        raise UsageError(f"unknown data.augment preset {preset!r} (known: {', '.join(PRESETS)})")
    if preset == "none":
        before = _eval_geometry("center", image_size, crop_pct)
        specs: list[str] = list(extra_ops)
    else:
        before, specs = [], [*_PRESET_OPS[preset], *extra_ops]
    after = []
    for spec in specs:
        name, op = build_op(spec, image_size)
        (after if name in AFTER_NORMALIZE else before).append(op)
    return v2.Compose([*before, *_finish(mean, std), *after])


def batch_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float):
    """MixUp and/or CutMix on whole batches (one of them per batch when both are on), or None.
    Labels become soft (batch, classes) targets, which nn.CrossEntropyLoss accepts."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class MixingCollate:
    """A DataLoader collate_fn: default collation, then the batch mixer (runs in the workers)."""

    def __init__(self, mixer):
        self.mixer = mixer

    def __call__(self, batch):
        images, labels = torch.utils.data.default_collate(batch)
        return self.mixer(images, labels)
