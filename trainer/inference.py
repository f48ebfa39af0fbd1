"""Run a checkpoint over image files: batched, multi-worker, CPU or GPU, bad files reported.

Used by `launch/predict.py` and `launch/evaluate.py`. A file that does not decode never stops the
run: its row is marked failed with the reason, and every other image still gets its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from data.folders import list_images
from data.images import load_rgb
from configs.errors import UsageError


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, plus every image under the folders named, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += list_images(path)
        elif path.is_file():
            found.append(path)  # named explicitly: tried even with an unusual extension
        else:
            raise UsageError(f"not a file or folder: {path}")
    if not found:
        raise UsageError(f"no images found in {', '.join(inputs)} (extensions tried: "
                         f"{'/'.join(sorted(e.lstrip('.') for e in ('.jpg', '.png', '.webp', '.bmp')))}...)")
    return found


class TolerantImageDataset(Dataset):
    """(image, index, error): a blank image and the decoding error for a file that fails."""

    def __init__(self, paths: list[Path], transform: Callable, image_size: int):
        self.paths, self.transform, self.image_size = paths, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(str(self.paths[index]))), index, ""
        except Exception as e:  # any decoder failure: truncated, not an image, unsupported mode
            return torch.zeros(3, self.image_size, self.image_size), index, f"{type(e).__name__}: {e}"


@dataclass
class Predictions:
    paths: list[Path]
    probs: torch.Tensor                     # (N, C) softmax; rows of failed files are NaN
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> torch.Tensor:
        return ~torch.isnan(self.probs[:, 0])


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


@torch.no_grad()
def predict_files(loaded, paths: list[Path], *, batch_size: int = 64, num_workers: int = 2,
                  device: torch.device = torch.device("cpu"), tta_flip: bool = False) -> Predictions:
    """Softmax probabilities for every file; with `tta_flip` averaged with the mirrored image's."""
    dataset = TolerantImageDataset(paths, loaded.eval_transform(), loaded.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda")
    model = loaded.model.to(device).eval()
    probs = torch.full((len(paths), len(loaded.class_names)), float("nan"))
    errors: dict[int, str] = {}
    for images, indices, problems in loader:
        good = torch.tensor([not p for p in problems], dtype=torch.bool)
        for i, problem in zip(indices.tolist(), problems):
            if problem:
                errors[i] = problem
        if not good.any():
            continue
        images = images[good].to(device, non_blocking=True)
        p = model(images).float().softmax(1)
        if tta_flip:
            p = (p + model(images.flip(-1)).float().softmax(1)) / 2
        probs[indices[good]] = p.cpu()
    return Predictions(paths, probs, errors)
