"""Model checkpoints as safetensors files that carry everything needed to rebuild and predict.

The header metadata (strings only, by the format's rule) holds the model name, head, class
names, the preprocessing (`data.transforms.Preprocessing`: what the model was validated on), the
resolved config, that epoch's metrics and which weights the file holds (`weights`: "raw", or
"ema" for the moving average of train.ema_decay). Weights are stored under the bare model's key names:
never with torch.compile's `_orig_mod.` or DDP/DataParallel's `module.`. Files are written to a
temporary name in the same folder, flushed, then renamed, so a reader never sees half a file and
a crash mid-write leaves the previous checkpoint intact.

Files written before `preprocessing` was recorded still load: their preprocessing is rebuilt from
the top-level `image_size`, `crop_pct`, `mean`, `std` (still written, for older readers) and the
crop mode of the run's `data.augment` preset, which is what their validation used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from configs.errors import UsageError
from data.files import atomic_output
from data.transforms import Preprocessing, crop_mode_of
from models.build import bare_keys

FORMAT = "imgtrain/classifier-v1"
_JSON_KEYS = ("head", "class_names", "mean", "std", "config", "metrics", "runtime", "preprocessing", "thresholds")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    with atomic_output(path, durable=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


@dataclass(frozen=True)
class ClassifierFacts:
    """What every model file of a run records besides its weights and metrics: built once per run."""

    model_name: str
    head: dict  # HeadSpec.to_dict()
    class_names: list[str]
    preprocessing: Preprocessing
    config: dict  # Config.to_dict()
    runtime: dict = field(default_factory=dict)  # e.g. num_processes, device, precision, global_batch_size


def save_classifier(path: str | Path, state_dict: dict[str, torch.Tensor], facts: ClassifierFacts, *,
                    metrics: dict, epoch: int, weights: str = "raw") -> None:
    """`weights`: "raw" (the trained weights) or "ema" (their moving average, train.ema_decay)."""
    p = facts.preprocessing
    metadata = {
        "format": FORMAT,
        "weights": weights,
        "model_name": facts.model_name,
        "head": json.dumps(facts.head),
        "class_names": json.dumps(list(facts.class_names)),
        "preprocessing": json.dumps(p.to_dict(), sort_keys=True),
        # The preprocessing's parts again, for readers of files written before it was recorded.
        "mean": json.dumps(list(p.mean)),
        "std": json.dumps(list(p.std)),
        "image_size": str(p.image_size),
        "crop_pct": str(p.crop_pct),
        "config": json.dumps(facts.config, sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True),
        "epoch": str(epoch),
        "runtime": json.dumps(facts.runtime, sort_keys=True),
        # single, or multilabel: sigmoid scores, each class called at its own threshold (below)
        "task": facts.config.get("data", {}).get("task", "single"),
    }
    if "val_thresholds" in metrics:  # multi-label: per-class thresholds chosen on validation, in class order
        metadata["thresholds"] = json.dumps([metrics["val_thresholds"][name] for name in facts.class_names])
    # The most asked-for facts also get top-level keys, readable without parsing JSON.
    if "val_acc" in metrics:
        metadata["val_acc"] = repr(float(metrics["val_acc"]))
    for key, value in facts.runtime.items():
        metadata.setdefault(key, str(value))
    atomic_save_safetensors(plain_tensors(bare_keys(state_dict)), path, metadata)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The header of a checkpoint with its JSON fields decoded; `preprocessing` is always there
    (a Preprocessing.to_dict()), also for files written before it was recorded."""
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
    try:
        for key in _JSON_KEYS:
            if key in meta:
                meta[key] = json.loads(meta[key])
        meta["image_size"] = int(meta["image_size"])
        meta["crop_pct"] = float(meta["crop_pct"])
        meta["epoch"] = int(meta["epoch"])
        meta.setdefault("config", {})
        meta.setdefault("task", "single")  # files from before multi-label
        if "preprocessing" not in meta:
            meta["preprocessing"] = _preprocessing_of_old_file(meta).to_dict()
        Preprocessing.from_dict(meta["preprocessing"])  # fails here, not later, when damaged
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} has a damaged header ({type(e).__name__}: {e}); use another checkpoint "
                         f"of the run (last.safetensors, best.safetensors)") from None
    return meta


def _preprocessing_of_old_file(meta: dict[str, Any]) -> Preprocessing:
    # Validation used the preset's eval geometry (a stretch run squashed), whatever the file says.
    preset = meta["config"].get("data", {}).get("augment", "standard")
    return Preprocessing(meta["image_size"], meta["crop_pct"], tuple(meta["mean"]), tuple(meta["std"]),
                         crop_mode_of(preset))


@dataclass
class LoadedClassifier:
    model: nn.Module  # in eval mode, on CPU
    class_names: list[str]
    preprocessing: Preprocessing  # what the model saw in validation
    metadata: dict[str, Any]  # read_metadata's answer

    def eval_transform(self):
        return self.preprocessing.eval_transform()

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuild the trained model from a checkpoint alone, in eval mode, on CPU. Files written with
    wrapper prefixes in their keys (before these were removed on saving) load too."""
    from models.build import HeadSpec, build_classifier, read_state_dict, state_dict_mismatch

    meta = read_metadata(path)
    built = build_classifier(meta["model_name"], len(meta["class_names"]), HeadSpec(**meta["head"]))
    state = read_state_dict(path)  # key names without compile/DDP prefixes, also for older files
    problem = state_dict_mismatch(built.model.state_dict(), state)
    if problem:
        raise UsageError(f"{path} does not fit {meta['model_name']} with {len(meta['class_names'])} classes "
                         f"({problem}); was it written by another version of the model?")
    built.model.load_state_dict(state)
    built.model.eval()
    return LoadedClassifier(built.model, meta["class_names"], Preprocessing.from_dict(meta["preprocessing"]), meta)
