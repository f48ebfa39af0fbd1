"""Classification metrics from labels and predictions: accuracy, per-class P/R/F1, confusion matrix.

The one place metrics are computed; trainer/plots.py only draws them."""

from __future__ import annotations

from typing import Sequence

import torch


def confusion_matrix(y_true, y_pred, num_classes: int) -> torch.Tensor:
    """counts[actual, predicted], from labels as torch tensors, numpy arrays or lists."""
    flat = torch.as_tensor(y_true).long().flatten() * num_classes + torch.as_tensor(y_pred).long().flatten()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix, class_names: Sequence[str]) -> list[dict]:
    """One row per class of a confusion matrix (tensor, array or nested lists); accuracy NaN for a
    class without images."""
    matrix = torch.as_tensor(matrix)
    rows = []
    for i, name in enumerate(class_names):
        images = int(matrix[i].sum())
        correct = int(matrix[i, i])
        rows.append({"class": name, "images": images, "correct": correct,
                     "accuracy": correct / images if images else float("nan")})
    return rows


def classification_report(y_true: torch.Tensor, y_pred: torch.Tensor, class_names: list[str]) -> dict:
    """Per class precision, recall, F1 and support; 0 where a ratio has nothing to divide by
    (no predictions of that class, or no examples of it), the usual convention."""
    cm = confusion_matrix(y_true, y_pred, len(class_names)).double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    per_class = {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                        "support": int(actual[i].item())} for i, name in enumerate(class_names)}
    present = actual > 0
    return {
        "accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "images": int(cm.sum().item()),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.long().tolist(),
    }
