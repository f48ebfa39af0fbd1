"""The task: what the head predicts and how it is judged. One object per kind of `data.task`, as
timm's `timm/task/` (a task owns its loss and its metrics):

    SingleLabel  "single"      one class per image: softmax, cross-entropy, val_acc, a confusion matrix
    MultiLabel   "multilabel"  any number of classes per image: a sigmoid per class, BCE, val_map and
                               F1 at per-class thresholds chosen on validation

`task_for(cfg)` is a run's task, `task_of(metadata)` a checkpoint's (its "task" header). The rest of
the code asks the task for its loss, its validation pass, which `train.best_metric` values it
allows and which way each is better (the table is in `best_metric.py`, which reading a config
imports without torch), a checkpoint's thresholds, its predictions CSV and its evaluation report,
and does not branch on its kind. Where a layer above this one does something
only one kind means (a confusion matrix picture, a Kaggle CSV of class indices, class folders or
shards as labelled input), it asks `one_class_per_image`.

Metric keys have one spelling, the one metrics.jsonl, checkpoint headers and `train.best_metric`
use: val_loss, val_acc, val_top5, val_map, val_f1_micro, val_f1_macro (the epoch table's column
headings abbreviate some of them: val_mAP, val_F1_micro).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import nn

from configs.errors import UsageError
from configs.schema import Config, TrainConfig
from data.balance import balanced_class_weights
from trainer.task.best_metric import ALLOWED, BestMetric, best_metric
from trainer.task.metrics import classification_report, multilabel_report
from trainer.task.multilabel import evaluate_multilabel
from trainer.task.single import evaluate_single

if TYPE_CHECKING:  # for annotations only: reading a config need not import Accelerate
    from accelerate import Accelerator


class Task:
    """What every task answers; SingleLabel and MultiLabel below are the two there are."""

    name: ClassVar[str]  # the value of data.task and of a checkpoint's "task" header
    one_class_per_image: ClassVar[bool]
    headline: ClassVar[str]  # the validation metric a run's summary line names, beside val_loss
    val_keys: ClassVar[tuple[str, ...]]  # a validation pass's metrics (besides val_images): the EMA's get ema_
    output_meaning: ClassVar[str]  # what the logits mean, for files read outside this project (ONNX)

    @property
    def best_metrics(self) -> dict[str, bool]:
        """The train.best_metric values this task allows -> whether higher is better."""
        return ALLOWED[self.name]

    def best(self, metric: str) -> BestMetric:
        """`metric` as train.best_metric of this task; one ConfigError line naming the allowed values."""
        return best_metric(self.name, metric)

    # ---- training ----

    def criterion(self, train: TrainConfig, train_labels: Sequence[int], num_classes: int) -> nn.Module:
        """The training loss (on the CPU; the caller moves it to the device)."""
        raise NotImplementedError

    def probe_target(self, num_classes: int) -> torch.Tensor:
        """One sample's target, for the batch-size probe's fake batches."""
        raise NotImplementedError

    def train_metrics(self, stats: dict) -> dict:
        """The training epoch's metrics this task reports (train_one_epoch counts top-1 hits for all)."""
        return stats

    def agreement(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The share of right decisions on one batch (the overfit check)."""
        raise NotImplementedError

    def validate(self, accelerator: Accelerator, model: nn.Module, loader, criterion: nn.Module,
                 class_names: list[str]) -> tuple[dict, object]:
        """One validation pass: (its metrics, val_* keys, and every image's labels and probabilities, with
        what the pictures of the pass need)."""
        raise NotImplementedError

    # ---- a checkpoint's predictions ----

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) -> what predict.py writes and evaluate.py measures."""
        raise NotImplementedError

    def thresholds(self, metadata: dict) -> torch.Tensor | None:
        """The per-class thresholds a checkpoint calls classes at (float64), or None."""
        return None

    def recorded(self, metadata: dict) -> dict:
        """What files outside the run record about the task (the Hub config's "imgtrain" table,
        the ONNX metadata): its name, and a multi-label model's thresholds."""
        return {"task": self.name}

    def truth(self, labels: list[int], targets: torch.Tensor | None) -> torch.Tensor:
        """The truth evaluate.py compares scores with: class indices, or (N, C) 0/1 targets."""
        raise NotImplementedError

    def report(self, scores: torch.Tensor, truth: torch.Tensor, class_names: list[str],
               thresholds: torch.Tensor | None) -> dict:
        """The evaluation report of the readable files' scores against their truth."""
        raise NotImplementedError

    def report_lines(self, report: dict, metadata: dict, split: str | None) -> list[str]:
        """evaluate.py's printed summary of `report`: the headline, what the checkpoint recorded on
        its own validation split, and the per-class table."""
        raise NotImplementedError

    def prediction_rows(self, preds, class_names: list[str], top_k: int,
                        thresholds: torch.Tensor | None = None) -> tuple[list[str], list[list]]:
        """(header, rows) of predict.py's CSV, `path, ..., error`: one row per file of `preds`
        (predict.py's FilePredictions); a failed file keeps its row, with an empty prediction."""
        raise NotImplementedError


class SingleLabel(Task):
    name = "single"
    one_class_per_image = True
    headline = "val_acc"
    val_keys = ("val_loss", "val_acc", "val_top5")
    output_meaning = "softmax gives probabilities"

    def criterion(self, train: TrainConfig, train_labels: Sequence[int], num_classes: int) -> nn.Module:
        weights = balanced_class_weights(train_labels, num_classes) if train.class_weights == "balanced" else None
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=train.label_smoothing)

    def probe_target(self, num_classes: int) -> torch.Tensor:
        return torch.tensor(0)

    def agreement(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        hard = targets.argmax(1) if targets.ndim == 2 else targets  # MixUp/CutMix targets are soft
        return (logits.argmax(1) == hard).float().mean().item()

    def validate(self, accelerator, model, loader, criterion, class_names):
        return evaluate_single(accelerator, model, loader, criterion, len(class_names))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)

    def truth(self, labels: list[int], targets: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor(labels)

    def report(self, scores, truth, class_names, thresholds=None) -> dict:
        """Accuracy, mean cross-entropy loss, macro F1, per-class precision / recall / F1 and the
        confusion matrix."""
        p = scores[torch.arange(len(truth)), truth].clamp_min(torch.finfo(torch.float32).tiny)
        return classification_report(truth, scores.argmax(1), class_names) | {
            "loss": -p.double().log().mean().item() if len(truth) else None}

    def report_lines(self, report: dict, metadata: dict, split: str | None) -> list[str]:
        lines = [f"accuracy {report['accuracy']:.4f} on {report['images']} images ({report['source']}), "
                 f"macro F1 {report['macro_f1']:.4f}"]
        recorded = metadata.get("metrics", {}).get("val_acc")
        if split == "val" and recorded is not None:
            lines.append(f"the checkpoint recorded val_acc {recorded:.4f} at epoch {metadata['epoch']}")
        width = max(len(n) for n in report["per_class"])
        lines.append(f"{'class':<{width}}  precision  recall      f1  support")
        lines += [f"{name:<{width}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {m['support']:>7d}"
                  for name, m in report["per_class"].items()]
        return lines

    def prediction_rows(self, preds, class_names, top_k, thresholds=None):
        """`path, class, probability, topK, error`."""
        k = min(top_k, len(class_names))
        rows = []
        for i, path in enumerate(preds.paths):
            if i in preds.errors:
                rows.append([str(path), "", "", "", preds.errors[i]])
                continue
            top = preds.probs[i].topk(k)
            best = top.indices[0].item()
            listing = ";".join(f"{class_names[c]}:{p:.4f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
            rows.append([str(path), class_names[best], f"{top.values[0].item():.6f}", listing, ""])
        return ["path", "class", "probability", f"top{k}", "error"], rows


class MultiLabel(Task):
    name = "multilabel"
    one_class_per_image = False
    headline = "val_map"
    # The thresholds are chosen on each weights' own scores: the EMA's are its own too.
    val_keys = ("val_loss", "val_map", "val_f1_micro", "val_f1_macro", "val_thresholds")
    output_meaning = "a sigmoid per class, called at or above its entry of thresholds"

    def criterion(self, train: TrainConfig, train_labels: Sequence[int], num_classes: int) -> nn.Module:
        return nn.BCEWithLogitsLoss()  # one independent yes/no per class (weights and smoothing are refused)

    def probe_target(self, num_classes: int) -> torch.Tensor:
        return torch.zeros(num_classes)

    def train_metrics(self, stats: dict) -> dict:
        return {k: v for k, v in stats.items() if k != "train_acc"}  # top-1 against the first label means nothing

    def agreement(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return ((logits > 0) == targets.bool()).float().mean().item()  # every (image, class) decision at 0.5

    def validate(self, accelerator, model, loader, criterion, class_names):
        return evaluate_multilabel(accelerator, model, loader, class_names)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def thresholds(self, metadata: dict) -> torch.Tensor:
        """Chosen on the run's validation split; 0.5 each for a file that records none."""
        recorded = metadata.get("thresholds")
        return torch.tensor(recorded if recorded else [0.5] * len(metadata["class_names"]), dtype=torch.float64)

    def recorded(self, metadata: dict) -> dict:
        return {"task": self.name, "thresholds": metadata.get("thresholds")}

    def truth(self, labels: list[int], targets: torch.Tensor | None) -> torch.Tensor:
        return targets

    def report(self, scores, truth, class_names, thresholds=None) -> dict:
        """mAP, micro / macro F1 and per-class precision / recall / F1 / AP at `thresholds`, and the
        mean BCE loss."""
        eps = 1e-7  # BCE on probabilities: clamp away from log(0)
        p = scores.double().clamp(eps, 1 - eps)
        loss = -(truth * p.log() + (1 - truth) * (1 - p).log()).mean().item() if len(truth) else None
        return multilabel_report(scores, truth, class_names, thresholds.tolist()) | {"loss": loss}

    def report_lines(self, report: dict, metadata: dict, split: str | None) -> list[str]:
        lines = [f"mAP {report['map']:.4f}, micro F1 {report['micro_f1']:.4f}, macro F1 {report['macro_f1']:.4f} "
                 f"on {report['images']} images ({report['source']}), at the checkpoint's per-class thresholds"]
        recorded = metadata.get("metrics", {}).get("val_map")
        if split == "val" and recorded is not None:
            lines.append(f"the checkpoint recorded val_map {recorded:.4f} at epoch {metadata['epoch']} (its "
                         f"thresholds were chosen on this split, so its F1 here is optimistic)")
        width = max(len(n) for n in report["per_class"])
        lines.append(f"{'class':<{width}}  precision  recall      f1      AP  threshold  support")
        for name, m in report["per_class"].items():
            ap = f"{m['ap']:>6.4f}" if not math.isnan(m["ap"]) else f"{'-':>6}"  # NaN: no positives here
            lines.append(f"{name:<{width}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {ap}  "
                         f"{m['threshold']:>9.4f}  {m['support']:>7d}")
        return lines

    def prediction_rows(self, preds, class_names, top_k, thresholds=None):
        """`path, labels, scores_topK, error`: labels are every class at or above its threshold
        (';'-separated, highest score first, possibly none), scores the top_k classes' "name:score"."""
        k = min(top_k, len(class_names))
        rows = []
        for i, path in enumerate(preds.paths):
            if i in preds.errors:
                rows.append([str(path), "", "", preds.errors[i]])
                continue
            p = preds.probs[i]
            order = p.argsort(descending=True).tolist()
            called = [class_names[c] for c in order if p[c].double() >= thresholds[c]]
            listing = ";".join(f"{class_names[c]}:{p[c].item():.4f}" for c in order[:k])
            rows.append([str(path), ";".join(called), listing, ""])
        return ["path", "labels", f"scores_top{k}", "error"], rows


TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), MultiLabel())}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; this version knows: {', '.join(TASKS)}")
    return TASKS[name]


def task_for(cfg: Config) -> Task:
    """A run's task (data.task)."""
    return task_named(cfg.data.task)


def task_of(metadata: dict) -> Task:
    """A checkpoint's task: its "task" header (files from before multi-label: single)."""
    return task_named(metadata.get("task", "single"))
