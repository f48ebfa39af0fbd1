"""data.image_size against the model, before the run folder is touched: one image at the configured
size through the model on the run's device, under its autocast; on CUDA forward and backward (the
memory a step needs), on CPU forward only (a backward pass of a ResNet-50 costs seconds on a few
cores, and CPU memory is not what fails there).

A network whose pooling or strided convolutions shrink the image below one pixel ("Output size is
too small": AlexNet under 63 px, VGG under 32), a ViT built for one size, or an image too large for
the device's memory would otherwise fail at the first training step, after config.toml, the
checkpoint folder and the sample grids were written. On failure the smallest size the model runs
on is searched (forward passes of one image, without gradients, from the configured size up,
doubling and then bisecting) and named in one line.

The probe leaves the model as it found it: every module's train/eval mode, no gradients, the RNG
streams (eval mode updates no BatchNorm statistics and draws no dropout).
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from configs.errors import ConfigError, TrainingFailed
from models import BuiltModel
from trainer.assemble.batch_size import is_out_of_memory, release_memory

SEARCH_CAP = 1024  # the smallest working size is looked for up to here


def check_image_size(built: BuiltModel, image_size: int, accelerator: Accelerator) -> None:
    """Raise ConfigError (bad data.image_size) or TrainingFailed (the model fails at any size)
    unless one image of `image_size` px goes forward and backward through `built.model`."""
    model, device = built.model.to(accelerator.device), accelerator.device
    error = _failure(model, image_size, device, accelerator.autocast, backward=device.type == "cuda")
    if error is None:
        return
    said = _first_line(error)
    if is_out_of_memory(error):
        raise ConfigError(f"model {built.name} does not fit in the memory of {device} with one image of "
                          f"data.image_size={image_size} px ({said}); use a smaller data.image_size")

    def runs(size: int) -> bool:
        return _failure(model, size, device, accelerator.autocast, backward=False) is None

    smallest = smallest_size(runs, image_size, _native_size(model))
    if smallest is None:
        raise TrainingFailed(f"model {built.name} fails on one image of data.image_size={image_size} px on "
                             f"{device.type}, and at every size tried: {said}")
    if smallest < image_size or not runs(smallest + 1):  # a model built for one size (a ViT's patch grid)
        raise ConfigError(f"model {built.name} does not run on images of {image_size} px ({said}); it runs on "
                          f"{smallest} px: set data.image_size={smallest}")
    raise ConfigError(f"model {built.name} needs images of at least {smallest} px; data.image_size={image_size} "
                      f"is too small ({said}): set data.image_size={smallest} or more")


def smallest_size(runs: Callable[[int], bool], failed: int, native: int | None = None,
                  cap: int = SEARCH_CAP) -> int | None:
    """The smallest size above `failed` for which `runs(size)` holds (doubling, then bisecting the
    gap); else `native` (the model's own size) when it runs; else None."""
    below, above = failed, None
    size = failed
    candidates = sorted({min(cap, failed * 2 ** k) for k in range(1, 12)} | ({native} if native else set()))
    for size in (c for c in candidates if c > failed):
        if runs(size):
            above = size
            break
        below = size
    if above is None:
        return native if native and native < failed and runs(native) else None
    while above - below > 1:
        middle = (below + above) // 2
        if runs(middle):
            above = middle
        else:
            below = middle
    return above


def _native_size(model: nn.Module) -> int | None:
    """The input side a timm model was made for (its pretrained config), if it says."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else None


def _failure(model: nn.Module, size: int, device: torch.device, autocast, backward: bool) -> Exception | None:
    """The exception one image of `size` px raises going through `model` (None: it runs)."""
    modes = {module: module.training for module in model.modules()}
    image = torch.zeros(1, 3, size, size, device=device)
    error = None
    try:
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.set_grad_enabled(backward), autocast():
            out = model(image)
            out = out if isinstance(out, torch.Tensor) else out[0]
            if backward and out.requires_grad:
                out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - whatever the model raises at this size is the answer
        error = e
    finally:
        for module, training in modes.items():
            module.training = training
        for p in model.parameters():
            p.grad = None
        del image
    if error is not None:
        error.__traceback__ = None  # the failed pass's tensors go with it
        release_memory()
    return error


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."
