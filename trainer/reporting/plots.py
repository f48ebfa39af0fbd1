"""Every PNG the project draws: curves, LR finder, confusion matrix, image grids, class distribution.

Pure functions of plain data (numpy arrays, lists, dicts) so they are easy to test and the same
files can be shown locally and logged to W&B. They only draw: the numbers come from
`trainer.task.metrics`. They use matplotlib's object API (`Figure`), which renders with Agg and never
touches pyplot's global state or needs a display. Every file is written through
`data.files.atomic_output`, so a reader never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from data.files import atomic_output

WRONG = "#d62728"
RIGHT = "#2ca02c"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalized floats -> (N, H, W, 3) floats in [0, 1], as the eye sees them."""
    images = images * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    return np.clip(images, 0.0, 1.0).transpose(0, 2, 3, 1)


def image_grid(path: str | Path, images: Sequence[np.ndarray], titles: Sequence[str],
               wrong: Sequence[bool] | None = None, title: str = "", columns: int = 8,
               empty: str = "no images") -> Path:
    """A grid of images, one title each; with `wrong`, wrong ones get a red frame and title, right
    ones a green title. `images`: (N, H, W, 3) floats in [0, 1], or a list of (H, W, 3) arrays (floats
    in [0, 1] or uint8) whose sizes may differ. With no images the grid says `empty`."""
    n = len(images)
    cols = min(n, columns) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.8 * cols, 2.1 * rows + 0.4), layout="constrained")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            if n == 0:
                ax.text(0.5, 0.5, empty, ha="center", va="center")
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
                           ("val_acc", acc_ax, "s-"), ("val_top5", acc_ax, "^--"),
                           ("val_map", acc_ax, "s-"), ("val_f1_macro", acc_ax, "d--")):  # the last two: multi-label
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


def confusion_plot(path: str | Path, matrix, class_names: Sequence[str], title: str = "") -> Path:
    """Rows are actual classes, columns predictions; colour is the row share, text the count."""
    matrix = np.asarray(matrix)  # a tensor or nested lists draw the same
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


def lr_curve(path: str | Path, lrs: Sequence[float], losses: Sequence[float], suggested: float) -> Path:
    """The LR finder's smoothed loss against the learning rate (log scale), the suggestion marked."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lrs, losses)
    ax.axvline(suggested, color=WRONG, linestyle="--", label=f"suggested {suggested:.2e}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (head)", ylabel="smoothed training loss", title="learning rate finder")
    ax.grid(alpha=0.3)
    ax.legend()
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
