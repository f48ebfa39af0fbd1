"""Model checkpoints as safetensors files that carry everything needed to rebuild and predict.

The header metadata (strings only, by the format's rule) holds the model name, head, class
names, preprocessing, the resolved config and that epoch's metrics. Files are written to a
temporary name in the same folder, flushed, then renamed, so a reader never sees half a file
and a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from configs.errors import UsageError

FORMAT = "imgtrain/classifier-v1"
_JSON_KEYS = ("head", "class_names", "mean", "std", "config", "metrics", "runtime")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_classifier(path: str | Path, state_dict: dict[str, torch.Tensor], *, model_name: str,
                    head: dict, class_names: list[str], mean, std, image_size: int, crop_pct: float,
                    config: dict, metrics: dict, epoch: int, runtime: dict | None = None) -> None:
    metadata = {
        "format": FORMAT,
        "model_name": model_name,
        "head": json.dumps(head),
        "class_names": json.dumps(list(class_names)),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "image_size": str(image_size),
        "crop_pct": str(crop_pct),
        "config": json.dumps(config, sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True),
        "epoch": str(epoch),
        "runtime": json.dumps(runtime or {}, sort_keys=True),
    }
    # The most asked-for facts also get top-level keys, readable without parsing JSON.
    if "val_acc" in metrics:
        metadata["val_acc"] = repr(float(metrics["val_acc"]))
    for key, value in (runtime or {}).items():
        metadata[key] = str(value)
    atomic_save_safetensors(plain_tensors(state_dict), path, metadata)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The header of a checkpoint with its JSON fields decoded."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged headers
        raise UsageError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if raw.get("format") != FORMAT:
        raise UsageError(f"{path} was not written by this project's trainer (no '{FORMAT}' header); "
                         f"pass it as model.weights instead")
    meta: dict[str, Any] = dict(raw)
    for key in _JSON_KEYS:
        if key in meta:
            meta[key] = json.loads(meta[key])
    meta["image_size"] = int(meta["image_size"])
    meta["crop_pct"] = float(meta["crop_pct"])
    meta["epoch"] = int(meta["epoch"])
    return meta


@dataclass
class LoadedClassifier:
    model: nn.Module
    class_names: list[str]
    mean: tuple
    std: tuple
    image_size: int
    crop_pct: float
    metadata: dict[str, Any]

    def eval_transform(self):
        from data.transforms import eval_transform

        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct)


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuild the trained model from a checkpoint alone, in eval mode, on CPU."""
    from models.build import HeadSpec, build_classifier, read_state_dict

    meta = read_metadata(path)
    built = build_classifier(meta["model_name"], len(meta["class_names"]), HeadSpec(**meta["head"]))
    built.model.load_state_dict(read_state_dict(path))
    built.model.eval()
    return LoadedClassifier(built.model, meta["class_names"], tuple(meta["mean"]), tuple(meta["std"]),
                            meta["image_size"], meta["crop_pct"], meta)
