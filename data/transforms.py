"""Train and eval transforms on uint8 image tensors (torchvision.transforms.v2), built from config.

A training pipeline is a preset (`data.augment`) plus extra named ops (`data.augment_ops`), each
written `name` or `name(key=value, ...)`, e.g. `"color_jitter(brightness=0.2, contrast=0.2)"`.
Every op is a thin use of a torchvision.transforms.v2 class.

Where the work happens (the least per sample, as FFCV, DALI and timm's prefetcher do it):
  at decode   the first crop-and-resize (random resized crop, the eval center crop, a squash to
              a square) is drawn from the image header's size and done by the decoder
              (`ImageTransform.load` -> data.images.decode_rgb): a JPEG is decoded at the
              smallest DCT scale that covers the crop, never at full size for nothing
  in workers  the other ops, on uint8 tensors; batches leave the workers as uint8 (4x fewer
              bytes to pin and copy than float32)
  on device   float conversion and normalization, then random erasing (it works on normalized
              images, as in timm) and MixUp/CutMix (`BatchFinish`)

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
import functools
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from configs.schema import IMAGENET_MEAN, IMAGENET_STD
from configs.errors import UsageError
from data.images import DEFAULT_MAX_PIXELS, Region, load_rgb

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


def normalize(images: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> float32 normalized, in one pass over the pixels."""
    shift, scale = _shift_scale(tuple(mean), tuple(std), images.device)
    fmt = torch.channels_last if channels_last and images.ndim == 4 else torch.preserve_format
    return images.to(torch.float32, memory_format=fmt).sub_(shift).div_(scale)


@functools.lru_cache(maxsize=16)
def _shift_scale(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-GPU copy per batch would wait for the GPU's queue.
    shift = torch.tensor([255.0 * m for m in mean], device=device).view(-1, 1, 1)
    scale = torch.tensor([255.0 * s for s in std], device=device).view(-1, 1, 1)
    return shift, scale


# ---- crop plans: the first crop-and-resize, done by the decoder ----

# Eval pixels stay within a grey level (mean) of full decode + resize: what a checkpoint was
# validated on is what predict.py sees, whichever decoder a future version uses.
EVAL_OVERSAMPLE = 2.0


class RandomResizedCropPlan:
    """torchvision's RandomResizedCrop draw on the header's size: the box and the output size, for
    data.images.decode_rgb. Drawn from Python's `random` (seeded per sample like torch's RNG, see
    data.sampling) with torchvision's algorithm: ten tries at a random area and aspect ratio, then
    the center crop that fits the ratio range."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, width: int, height: int) -> Region:
        # Decoded at the fastest scale: augmentation moves pixels far more than DCT scaling does.
        return Region(self._box(width, height), (self.size, self.size))

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height
        w, h = width, height
        if in_ratio < min(self.ratio):
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w = int(round(h * max(self.ratio)))
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __repr__(self) -> str:
        return f"RandomResizedCropPlan(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class CenterCropPlan:
    """Resize the short side to size / crop_pct, then take the center size x size, as one box
    (the same geometry as torchvision's Resize + CenterCrop)."""

    def __init__(self, size: int, crop_pct: float):
        self.size, self.crop_pct = size, crop_pct
        self.resize = max(size, round(size / crop_pct))

    def __call__(self, width: int, height: int):
        short, long = min(width, height), max(width, height)
        long_resized = int(self.resize * long / short)  # torchvision's rounding of the long side
        new_w, new_h = (self.resize, long_resized) if width <= height else (long_resized, self.resize)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        fx, fy = width / new_w, height / new_h
        box = (left * fx, top * fy, (left + self.size) * fx, (top + self.size) * fy)
        return Region(box, (self.size, self.size), EVAL_OVERSAMPLE)

    def __repr__(self) -> str:
        return f"CenterCropPlan(size={self.size}, crop_pct={self.crop_pct})"


class SquashPlan:
    """The whole image resized to a square, ignoring its aspect ratio."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, width: int, height: int):
        return Region((0, 0, width, height), (self.size, self.size), EVAL_OVERSAMPLE)

    def __repr__(self) -> str:
        return f"SquashPlan(size={self.size})"


class ImageTransform:
    """A file -> the uint8 (3, H, W) tensor a worker hands on: a crop plan done by the decoder, then
    tensor ops. Normalization is not here; it happens on the device (`normalize`, `BatchFinish`)."""

    def __init__(self, plan, ops: list):
        self.plan, self.ops = plan, list(ops)

    def load(self, path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        image = load_rgb(path, max_pixels, self.plan)
        return apply_ops(image, self.ops, draw_op_seed()) if self.ops else image

    def __repr__(self) -> str:  # part of the feature cache's key (trainer.assemble.feature_cache): stable across runs
        return f"ImageTransform(plan={self.plan!r}, ops={self.ops!r})"


def draw_op_seed() -> int:
    """The seed a sample's ops run under, drawn from torch's RNG (seeded per sample by
    data.sampling), so the ops replay the same wherever they run: in a worker, or on the device
    after a GPU decode (data.device_decode)."""
    return int(torch.randint(2**62, ()).item())


def apply_ops(image: torch.Tensor, ops: list, seed: int) -> torch.Tensor:
    torch.default_generator.manual_seed(seed)  # v2 ops draw on the CPU, whatever device the image is on
    for op in ops:
        image = op(image)
    return image


def erase_on_device(op: v2.RandomErasing, image: torch.Tensor) -> torch.Tensor:
    """`op(image)` with the same random draws (torch's CPU RNG), but the erasing value copied to the
    device without waiting: torchvision assigns a CPU tensor into the image, a blocking copy that
    would make the host wait for the GPU once per image."""
    if torch.rand(1).item() >= op.p:
        return image
    p = op.make_params([image])
    if p["v"] is None:
        return image
    image[..., p["i"]:p["i"] + p["h"], p["j"]:p["j"] + p["w"]] = p["v"].to(image.device, image.dtype, non_blocking=True)
    return image


class BatchFinish:
    """A uint8 batch on the device -> what the model takes: float and normalized (channels_last on
    request), then the ops that work on normalized images (random erasing, per sample) and
    MixUp/CutMix. Their random numbers come from torch's CPU RNG, which the caller seeds per batch
    (data.sampling.TrainBatches), so a replayed batch is bit-for-bit the same."""

    def __init__(self, mean, std, after: list = (), mixer=None, channels_last: bool = False, decode=None):
        """`decode` (data.device_decode.DeviceDecode): batches of encoded JPEGs decoded on the device first."""
        self.mean, self.std, self.after, self.mixer = tuple(mean), tuple(std), list(after), mixer
        self.channels_last, self.decode = channels_last, decode

    def __call__(self, images, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decode is not None:
            images = self.decode(images)
        images = normalize(images, self.mean, self.std, self.channels_last)
        for op in self.after:
            for i in range(len(images)):
                images[i] = erase_on_device(op, images[i]) if isinstance(op, v2.RandomErasing) else op(images[i])
        if self.mixer is not None:
            images, labels = self.mixer(images, labels)
        return images, labels


# The eval geometry of each preset, in timm's crop_mode names: "center" resizes the short side to
# image_size / crop_pct and takes the center; "squash" resizes to a square, ignoring the aspect
# ratio; "border" pads to a square first (timm pads with the mean; we pad with black, as the
# campus seed does).
CROP_MODES = {"stretch": "squash", "square": "border"}


def crop_mode_of(preset: str) -> str:
    return CROP_MODES.get(preset, "center")


class NormalizedBatches:
    """A loader of (uint8 images, labels) batches, yielding the images normalized on whatever
    device the loader delivers them to (evaluation's counterpart of `BatchFinish`)."""

    def __init__(self, loader, preprocessing: "Preprocessing", channels_last: bool = False):
        self.loader, self.preprocessing, self.channels_last = loader, preprocessing, channels_last

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        p = self.preprocessing
        for images, labels in self.loader:
            yield normalize(images, p.mean, p.std, self.channels_last), labels


def _eval_geometry(crop_mode: str, image_size: int, crop_pct: float) -> tuple[object, list]:
    """(crop plan, tensor ops) of the eval geometry."""
    if crop_mode == "border":  # the padding must come first: no crop plan can express it
        return None, [PadToSquare(), v2.Resize((image_size, image_size), antialias=True)]
    if crop_mode == "squash":
        return SquashPlan(image_size), []
    # Resize the short side to image_size / crop_pct (256 for 224), then take the center.
    return CenterCropPlan(image_size, crop_pct), []


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

    def eval_transform(self) -> ImageTransform:
        """File -> uint8 tensor; `normalize` finishes it (on the device)."""
        return ImageTransform(*_eval_geometry(self.crop_mode, self.image_size, self.crop_pct))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def load_normalized(self, path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """One file as the model takes it: (3, H, W) float32, on the CPU."""
        return self.normalize(self.eval_transform().load(path, max_pixels))

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


def flips_horizontally(preset: str, extra_ops: list[str] = ()) -> bool:
    """Whether training with this preset and these extra ops mirrored images left-right: only then
    is a mirrored image something the model has learned to read (flip TTA)."""
    return any(parse_op(spec)[0] == "hflip" for spec in [*_PRESET_OPS.get(preset, []), *extra_ops])


def train_transform(preset: str, image_size: int, crop_pct: float = 0.875,
                    extra_ops: list[str] = ()) -> tuple[ImageTransform, list]:
    """(the per-sample transform for workers, the ops for `BatchFinish` after normalization)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown data.augment preset {preset!r} (known: {', '.join(PRESETS)})")
    if preset == "none":
        plan, before = _eval_geometry("center", image_size, crop_pct)
        specs: list[str] = list(extra_ops)
    else:
        plan, before, specs = None, [], [*_PRESET_OPS[preset], *extra_ops]
    if plan is None and specs:
        plan = _decode_plan(specs[0], image_size)
        specs = specs[1:] if plan is not None else specs
    after = []
    for spec in specs:
        name, op = build_op(spec, image_size)
        (after if name in AFTER_NORMALIZE else before).append(op)
    return ImageTransform(plan, before), after


def _decode_plan(spec: str, image_size: int):
    """The crop plan that does op `spec` at decode, if it is a plain crop-and-resize."""
    name, kwargs = parse_op(spec)
    if name == "resize_square":
        return SquashPlan(image_size)
    if name == "random_resized_crop" and set(kwargs) <= {"scale", "ratio"}:
        return RandomResizedCropPlan(image_size, **kwargs)
    return None


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


