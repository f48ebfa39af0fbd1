"""The multi-label validation pass (`data.task = "multilabel"`): loss, mAP, F1 and the per-class
thresholds predict.py applies.

Every validation image's sigmoid scores are gathered once (`gather_for_metrics` drops what the
distributed sampler duplicated); the thresholds are those that maximise each class's F1 on this
validation split, so the F1 shown beside them is an optimistic estimate: `evaluate.py` on a
held-out labelled folder applies them as recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.task.metrics import best_f1_thresholds, multilabel_report

if TYPE_CHECKING:  # for annotations only: reading a config need not import Accelerate
    from accelerate import Accelerator


@dataclass
class MultiLabelPredictions:
    """One multi-label validation pass, every image in the validation set's order (what went wrong)."""
    labels: np.ndarray  # (N, C) 0/1 targets
    probs: np.ndarray  # (N, C) each class's sigmoid score
    thresholds: np.ndarray  # (C,) where each class is called, chosen on this pass


@torch.no_grad()
def evaluate_multilabel(accelerator: Accelerator, model: nn.Module, loader,
                        class_names: list[str]) -> tuple[dict, MultiLabelPredictions]:
    """val_loss (BCE, the mean over images and classes as in training), val_map, val_f1_micro and
    val_f1_macro at the thresholds chosen here, and those thresholds (class name -> threshold); and
    every image's targets and scores."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        with accelerator.autocast():
            logits = model(images)
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        all_logits.append(logits)  # on the device: one copy to the host at the end
        all_targets.append(targets)
    logits, truth = torch.cat(all_logits).cpu(), torch.cat(all_targets).cpu()
    loss = F.binary_cross_entropy_with_logits(logits.double(), truth.double()).item()
    scores = logits.sigmoid()
    thresholds = best_f1_thresholds(scores, truth)
    report = multilabel_report(scores, truth, class_names, thresholds)
    if not math.isfinite(loss):
        accelerator.print("warning: validation loss is not finite")
    stats = {"val_loss": loss, "val_map": report["map"], "val_f1_micro": report["micro_f1"],
             "val_f1_macro": report["macro_f1"], "val_images": report["images"],
             "val_thresholds": dict(zip(class_names, thresholds))}
    return stats, MultiLabelPredictions(truth.numpy(), scores.numpy(), np.asarray(thresholds, dtype=np.float64))
