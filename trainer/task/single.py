"""The single-label validation pass (`data.task = "single"`): loss, accuracy (and top-5 with five or
more classes), every image's label and top-1 prediction (the confusion matrix) and a few images
with theirs (the prediction grid)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # for annotations only: reading a config need not import Accelerate
    from accelerate import Accelerator

SAMPLE_IMAGES = 16  # images in each picture of samples: training images, the validation prediction grid


@dataclass
class ValidationPredictions:
    """One validation pass: every image's label and prediction, plus a few images to show."""
    labels: np.ndarray
    predicted: np.ndarray
    sample_images: torch.Tensor  # normalized (N, 3, H, W) from the main process's shard
    sample_labels: list[int]
    sample_predicted: list[int]
    probs: np.ndarray | None = None  # (N, C) every image's softmax, in the validation set's order (what went wrong)


@torch.no_grad()
def evaluate_single(accelerator: Accelerator, model: nn.Module, loader, criterion,
                    num_classes: int) -> tuple[dict, ValidationPredictions]:
    """Loss, accuracy (and top-5 with >= 5 classes) over every validation image exactly once, every
    image's label, top-1 prediction (for the confusion matrix) and probabilities (for what went
    wrong), in the validation set's order, and a few of this process's images with theirs (for the
    prediction grid)."""
    model.eval()
    per_sample = nn.CrossEntropyLoss(reduction="none", label_smoothing=criterion.label_smoothing)
    losses, hits, hits5, all_labels, all_top1, all_probs = [], [], [], [], [], []
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    kept, seen_locally = 0, 0
    # The validation order is sorted by class: pick grid images spread over the whole shard, not
    # the first batch (which would show one class).
    stride = max(1, math.ceil(len(loader.dataset) / accelerator.num_processes) // SAMPLE_IMAGES)
    k = min(5, num_classes)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)
        loss = per_sample(logits.float(), labels)
        top = logits.topk(k, dim=1).indices
        if kept < SAMPLE_IMAGES:
            # Local images, no collective: the grid shows part of the main process's shard.
            positions = torch.arange(seen_locally, seen_locally + len(labels), device=labels.device)
            pick = (positions % stride == 0).nonzero().squeeze(1)[:SAMPLE_IMAGES - kept]
            samples.append((images[pick].float().cpu(), labels[pick].cpu(), top[pick, 0].cpu()))
            kept += len(pick)
        seen_locally += len(labels)
        # gather_for_metrics drops the samples the distributed sampler duplicated for even shards.
        loss, labels, top, probs = accelerator.gather_for_metrics((loss, labels, top, logits.float().softmax(1)))
        losses.append(loss.double())
        hits.append(top[:, 0] == labels)
        hits5.append((top == labels[:, None]).any(1))
        all_labels.append(labels)  # kept on the device: one copy to the host at the end, not one per batch
        all_top1.append(top[:, 0])
        all_probs.append(probs)
    n = sum(len(h) for h in hits)
    stats = {"val_loss": torch.cat(losses).sum().item() / n, "val_acc": torch.cat(hits).double().sum().item() / n}
    if num_classes >= 5:
        stats["val_top5"] = torch.cat(hits5).double().sum().item() / n
    stats["val_images"] = n
    if not math.isfinite(stats["val_loss"]):
        accelerator.print("warning: validation loss is not finite")
    predictions = ValidationPredictions(
        labels=torch.cat(all_labels).cpu().numpy(), predicted=torch.cat(all_top1).cpu().numpy(),
        sample_images=torch.cat([s[0] for s in samples]), sample_labels=torch.cat([s[1] for s in samples]).tolist(),
        sample_predicted=torch.cat([s[2] for s in samples]).tolist(), probs=torch.cat(all_probs).cpu().numpy())
    return stats, predictions
