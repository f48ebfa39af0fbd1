"""A timm checkpoint as a Hugging Face Hub model folder that plain timm loads.

`model.safetensors` + `config.json` in timm's own pretrained-config form (written by timm's
`save_config_for_hf`, so it follows timm's format as timm changes it), then
`timm.create_model("local-dir:FOLDER", pretrained=True)` or, once pushed,
`timm.create_model("hf-hub:USER/REPO", pretrained=True)` rebuilds the fine-tuned model with its
label names and the preprocessing its validation used. Only timm backbones with a linear head
have that form: torchvision's and our own models, and the mlp head, are refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from configs.errors import ProjectError, UsageError
from data.transforms import Preprocessing
from trainer.files.model_file import LoadedClassifier, plain_tensors
from trainer.task.task import task_of

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
INTERPOLATION = "bilinear"  # data.images resizes with PIL's bilinear filter (antialiased by its box)


def hub_refusal(model_name: str, head: dict) -> str | None:
    """Why this checkpoint has no timm Hub form, or None when it has one."""
    if not model_name.startswith("timm/"):
        return (f"--format hub writes timm's model folder, and {model_name} is not a timm backbone; "
                f"use --format onnx (or train a timm/<name> backbone)")
    if head.get("kind", "linear") != "linear":
        return (f"--format hub: timm rebuilds only its own linear head, and this checkpoint has "
                f"model.head={head.get('kind')!r}; use --format onnx")
    return None


def timm_data_config(p: Preprocessing) -> tuple[dict, list[str]]:
    """timm's data config for the run's eval transform, and notes where timm's cannot equal it."""
    notes = []
    crop_pct = p.crop_pct
    if p.crop_mode == "center" and round(p.image_size / p.crop_pct) != int(p.image_size / p.crop_pct):
        notes.append(f"center crop: timm resizes the short side to floor({p.image_size}/{p.crop_pct}), this run "
                     f"to round(...), one pixel more")
    if p.crop_mode == "squash":
        crop_pct = 1.0  # ours squashes the whole image to size; timm's squash at 1.0 does the same
    if p.crop_mode == "border":
        crop_pct = 1.0
        notes.append("border: timm pads with the mean colour and this run padded with black, so the "
                     "padded margins of non-square images differ")
    config = {"input_size": (3, p.image_size, p.image_size), "interpolation": INTERPOLATION,
              "crop_pct": crop_pct, "crop_mode": p.crop_mode, "mean": tuple(p.mean), "std": tuple(p.std)}
    return config, notes


def plain_timm_model(loaded: LoadedClassifier) -> torch.nn.Module:
    """The timm model `timm.create_model` builds for this checkpoint, holding its weights."""
    import timm

    name = loaded.metadata["model_name"][len("timm/"):]
    model = timm.create_model(name, pretrained=False, num_classes=len(loaded.class_names))
    problem = _load_exactly(model, loaded.model.state_dict())
    if problem:
        raise UsageError(f"timm.create_model({name!r}, num_classes={len(loaded.class_names)}) does not take this "
                         f"checkpoint's weights ({problem}); use --format onnx")
    return model.eval()


def _load_exactly(model: torch.nn.Module, state: dict) -> str:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return ""


def write_hub_files(loaded: LoadedClassifier, folder: Path) -> list[str]:
    """model.safetensors and config.json into `folder`; returns notes on the preprocessing."""
    from timm.models._hub import save_config_for_hf

    model = plain_timm_model(loaded)
    data_config, notes = timm_data_config(loaded.preprocessing)
    # {"format": "pt"} is what the Hub's own writers put in the header.
    save_file(plain_tensors(model.state_dict()), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    # "imgtrain": what timm's config has no field for (the task; a multi-label model's thresholds).
    ours = task_of(loaded.metadata).recorded(loaded.metadata)
    save_config_for_hf(model, str(folder / CONFIG_NAME),
                       model_config={"label_names": list(loaded.class_names), "imgtrain": ours},
                       data_config=data_config)
    return notes


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload `folder` to the Hub model repository `repo_id` (created if missing); its URL."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ProjectError(f"could not push to {repo_id}: HF_HUB_OFFLINE is set; the export in {folder} is "
                           f"complete: push it later with `hf upload {repo_id} {folder}`")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="Upload fine-tuned classifier from imgtrain")
    except Exception as e:  # network, authentication, permissions: all end the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ProjectError(f"could not push to {repo_id} ({type(e).__name__}: {first}); the export in {folder} "
                           f"is complete: log in with `hf auth login` and push it with "
                           f"`hf upload {repo_id} {folder}`") from None
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"
