"""Classification metrics from labels and predictions: accuracy, per-class P/R/F1, confusion matrix.

The one place metrics are computed; trainer/reporting/plots.py only draws them."""

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


# ----------------------------------------------------------------------------------------------
# Multi-label: scores (N, C) in [0, 1] and 0/1 targets (N, C); each class is its own yes/no question.


def _ranked(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct scores high to low, true positives, false positives) when everything at or above
    each score is called positive; tied scores are one threshold (they cannot be told apart)."""
    order = scores.double().argsort(descending=True, stable=True)
    s, t = scores.double()[order], truth.double()[order]
    tp, fp = t.cumsum(0), (1 - t).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return s[last], tp[last], fp[last]


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the precision-recall steps, sum of (R_n - R_n-1) P_n over thresholds (scikit-learn's
    average_precision_score); NaN without positives."""
    positives = float(truth.sum())
    if positives == 0:
        return float("nan")
    _, tp, fp = _ranked(scores, truth)
    recall = tp / positives
    steps = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return float((steps * tp / (tp + fp)).sum())


def best_f1_thresholds(scores: torch.Tensor, truth: torch.Tensor, default: float = 0.5) -> list[float]:
    """Per class, the threshold (predict positive at or above it) with the highest F1 on these scores:
    half-way between the score that maximises F1 and the next lower one, so a score just below the
    best one is still a negative. `default` for a class without positives here."""
    thresholds = []
    for c in range(scores.shape[1]):
        positives = float(truth[:, c].sum())
        if positives == 0:
            thresholds.append(default)
            continue
        s, tp, fp = _ranked(scores[:, c], truth[:, c])
        f1 = 2 * tp / (tp + fp + positives)  # 2TP / (2TP + FP + FN), with FN = positives - TP
        k = int(f1.argmax())  # the first maximum: the highest threshold among equals
        below = float(s[k + 1]) if k + 1 < len(s) else 0.0
        thresholds.append((float(s[k]) + below) / 2)
    return thresholds


def multilabel_report(scores: torch.Tensor, truth: torch.Tensor, class_names: list[str],
                      thresholds: list[float]) -> dict:
    """mAP (macro average precision), micro and macro F1 at per-class `thresholds`, and per class
    precision, recall, F1, AP and support. Macro averages are over classes with positives."""
    truth = truth.bool()
    predicted = scores.double() >= torch.tensor(thresholds, dtype=torch.float64)  # halfway points stay between scores
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    ap = [average_precision(scores[:, c], truth[:, c]) for c in range(len(class_names))]
    present = (tp + fn) > 0
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    per_class = {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                        "ap": ap[i], "support": int((tp + fn)[i].item()), "threshold": thresholds[i]}
                 for i, name in enumerate(class_names)}
    return {
        "map": float(torch.tensor([a for a, p in zip(ap, present) if p]).mean()) if present.any() else 0.0,
        "micro_f1": micro.item(),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "images": int(truth.shape[0]),
        "per_class": per_class,
    }
