"""Feature caching for a frozen backbone: run the backbone once, train the head on its features.

Valid only when the backbone never changes and every epoch sees the same input (model.freeze =
"backbone", data.augment = "none"; `models.finetune.check_finetune_config` enforces it). Features
live in one safetensors file per (backbone weights, preprocessing) key, one tensor per image named
by the SHA-256 of the file's bytes: renaming or moving images keeps the cache, editing one
recomputes only that image, and runs on other splits of the same folder share it.

The backbone runs in eval mode (BatchNorm running statistics, dropout off); the uncached path
does the same for frozen BatchNorm layers, so both see the same features, except for dropout
*inside* a frozen backbone (AlexNet's and VGG's classifier layers), which only the uncached path
applies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from data.files import atomic_output, sha256_file
from trainer.assemble.process_group import wait_for_the_main_process


def backbone_key(model: nn.Module, head_name: str, model_name: str, preprocessing: dict) -> str:
    """Changes whenever the backbone's weights or the preprocessing change."""
    h = hashlib.sha256(json.dumps({"model": model_name, **preprocessing}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(head_name + "."):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{model_name.replace('/', '_')}-{h.hexdigest()[:16]}"


class _WithoutHead(nn.Module):
    """The model with its head swapped for Identity, restored afterwards."""

    def __init__(self, model: nn.Module, head_name: str):
        super().__init__()
        self.model, self.head_name = model, head_name

    def __enter__(self) -> nn.Module:
        self.head = self.model.get_submodule(self.head_name)
        self.model.set_submodule(self.head_name, nn.Identity())
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.set_submodule(self.head_name, self.head)


@torch.no_grad()
def compute_features(model: nn.Module, head_name: str, dataset, to_input: Callable, batch_size: int,
                     num_workers: int) -> torch.Tensor:
    """Backbone features of a dataset of uint8 images; `to_input` moves a batch to the model's
    device and normalizes it there."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    out = []
    with _WithoutHead(model, head_name) as backbone:
        backbone.eval()
        for images, _ in loader:
            out.append(backbone(to_input(images)).float().flatten(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def cached_features(model: nn.Module, head_name: str, dataset, cache_file: Path, to_input: Callable,
                    batch_size: int, num_workers: int) -> torch.Tensor:
    """Features for every sample of an `ImageListDataset`, computing only those not in `cache_file`."""
    digests = [sha256_file(path) for path, _ in dataset.samples]
    known: dict[str, torch.Tensor] = {}
    if cache_file.is_file():
        with safe_open(str(cache_file), framework="pt") as f:
            known = {k: f.get_tensor(k) for k in set(digests) & set(f.keys())}
    missing = sorted({i for i, d in enumerate(digests) if d not in known})
    if missing:
        subset = torch.utils.data.Subset(dataset, missing)
        fresh = compute_features(model, head_name, subset, to_input, batch_size, num_workers)
        new = {digests[i]: fresh[j] for j, i in enumerate(missing)}
        everything = dict(known)
        if cache_file.is_file():  # keep what other splits stored, not only what this split needs
            with safe_open(str(cache_file), framework="pt") as f:
                everything = {k: f.get_tensor(k) for k in f.keys()}
        everything.update(new)
        with atomic_output(cache_file, durable=True) as tmp:
            save_file({k: v.contiguous() for k, v in everything.items()}, str(tmp),
                      metadata={"format": "imgtrain/features-v1"})
        known.update(new)
    return torch.stack([known[d] for d in digests])


def cached_head_datasets(accelerator, built, data, cfg, num_workers: int) -> tuple[TensorDataset, TensorDataset, nn.Module]:
    """(train features, val features, the head to train) of a trainer.assemble.run_parts.RunData. The main
    process fills the cache; the others wait, then read it, so every process trains on the same features."""
    train_ds, val_ds, pre = data.train_images, data.val_images, data.preprocessing
    preprocessing = {**pre.to_dict(), "transform": repr(val_ds.transform)}
    cache_file = (Path(cfg.train.feature_cache_dir).expanduser()
                  / f"{backbone_key(built.model, built.head_name, built.name, preprocessing)}.safetensors")
    built.model.to(accelerator.device)

    def to_input(images: torch.Tensor) -> torch.Tensor:
        return pre.normalize(images.to(accelerator.device))

    out = []
    for turn in ("main", "others"):
        if (turn == "main") == accelerator.is_main_process:
            for ds in (train_ds, val_ds):
                feats = cached_features(built.model, built.head_name, ds, cache_file, to_input,
                                        cfg.data.batch_size, num_workers)
                out.append(TensorDataset(feats, torch.tensor([label for _, label in ds.samples])))
        wait_for_the_main_process(accelerator)  # the main process may compute for longer than runtime.ddp_timeout
    return out[0], out[1], built.model.get_submodule(built.head_name)


def with_sample_images(predictions, val_ds, num_processes: int, batch_size: int, preprocessing):
    """With cached features the validation "images" the loop keeps for the prediction grid are
    feature vectors; put the real images back. The main process's b-th batch is the sharded
    loader's global batch b * num_processes (Accelerate gives whole batches round-robin)."""
    import dataclasses

    count = len(predictions.sample_labels)
    indices = [(j // batch_size) * num_processes * batch_size + j % batch_size for j in range(count)]
    images = preprocessing.normalize(torch.stack([val_ds[i][0] for i in indices])) if indices else predictions.sample_images
    return dataclasses.replace(predictions, sample_images=images)
