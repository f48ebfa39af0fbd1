"""The run's pictures as PNG files: curves, confusion matrix, image grids, class distribution.

Pure functions of plain data (numpy arrays, lists, dicts) so they are easy to test and the same
files can be shown locally and logged to W&B. They use matplotlib's object API (`Figure`), which
renders with Agg and never touches pyplot's global state or needs a display. Every file is
written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

WRONG = "#d62728"
RIGHT = "#2ca02c"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalized floats -> (N, H, W, 3) floats in [0, 1], as the eye sees them."""
    images = images * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    return np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(class_names):
        images = int(matrix[i].sum())
        correct = int(matrix[i, i])
        rows.append({"class": name, "images": images, "correct": correct,
                     "accuracy": correct / images if images else float("nan")})
    return rows


def image_grid(path: str | Path, images: np.ndarray, titles: Sequence[str], wrong: Sequence[bool] | None = None,
               title: str = "") -> Path:
    """A grid of (N, H, W, 3) images in [0, 1], one title each; wrong ones get a red frame and title."""
    n = len(images)
    cols = min(n, 8) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.8 * cols, 2.1 * rows + 0.4), layout="constrained")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i], interpolation="nearest")
        color = "black"
        if wrong is not None:
            color = WRONG if wrong[i] else RIGHT
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if wrong[i] else 1)
        ax.set_title(titles[i], fontsize=8, color=color)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def curves(path: str | Path, epochs: Sequence[dict], steps: Sequence[dict] = ()) -> Path:
    """Loss (per step, faint, and per epoch) and accuracy per epoch, side by side."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if steps:
        # Steps on the epoch axis so both loss series share one x scale.
        loss_ax.plot([s["epoch_progress"] for s in steps], [s["loss"] for s in steps], color="#1f77b4",
                     alpha=0.3, linewidth=0.8, label="train loss (steps)")
    x = [e["epoch"] for e in epochs]
    for key, ax, style in (("train_loss", loss_ax, "o-"), ("val_loss", loss_ax, "s-"), ("train_acc", acc_ax, "o-"),
                           ("val_acc", acc_ax, "s-"), ("val_top5", acc_ax, "^--")):
        values = [e.get(key) for e in epochs]
        if values and all(v is not None for v in values):
            ax.plot(x, values, style, label=key.replace("_", " "))
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_plot(path: str | Path, matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Path:
    """Rows are actual classes, columns predictions; colour is the row share, text the count."""
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2), 30.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    if n <= 60:  # beyond that, labels and counts are unreadable anyway
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title=title or "confusion matrix")
    return _save(fig, path)


def class_distribution(path: str | Path, class_names: Sequence[str], counts: dict[str, dict[str, int]]) -> Path:
    """Images per class in each split (`counts` maps split name -> class name -> count)."""
    n = len(class_names)
    fig = Figure(figsize=(min(max(6.0, 0.3 * n + 2), 30.0), 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(counts), 1)
    for k, (split, per_class) in enumerate(counts.items()):
        ax.bar(np.arange(n) + k * width, [per_class.get(c, 0) for c in class_names], width, label=split)
    if n <= 60:
        ax.set_xticks(np.arange(n) + 0.4 - width / 2, class_names, rotation=90, fontsize=8)
    ax.set(ylabel="images", title="images per class")
    ax.legend()
    return _save(fig, path)
