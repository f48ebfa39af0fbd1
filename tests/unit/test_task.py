"""The task objects (trainer/task/task.py): each kind's loss, validation metrics, best-epoch rule and
direction, thresholds and prediction columns; train.best_metric checked against the run's task; and
a multi-label run that picks its best epoch by val_map, across a resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from configs.errors import ConfigError, UsageError
from configs.schema import TrainConfig, _fields
from helpers import MULTILABEL, make_multilabel_folder, reset_accelerate_state
from trainer.assemble.run_config import load_config
from trainer.fit.ema import better_weights, prefixed
from trainer.fit.history import RunHistory
from trainer.task.task import TASKS, MultiLabel, SingleLabel, task_for, task_of

SINGLE, MULTI = SingleLabel(), MultiLabel()
NAMES = ["blue", "green", "red"]


def test_the_factories_name_one_object_per_kind():
    assert set(TASKS) == {"single", "multilabel"}
    assert task_of({}).name == "single"  # files from before multi-label
    assert task_of({"task": "multilabel"}) is TASKS["multilabel"]
    with pytest.raises(UsageError, match="unknown task 'regression'; this version knows: single, multilabel"):
        task_of({"task": "regression"})


# ---- the loss ----

def test_single_label_loss_is_cross_entropy_with_smoothing_and_balanced_weights():
    loss = SINGLE.criterion(TrainConfig(label_smoothing=0.1, class_weights="balanced"), [0, 0, 0, 1], 3)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    assert loss.weight.tolist() == pytest.approx([4 / 6, 2.0, 0.0])  # n / (present classes * n_c); absent: 0
    assert SINGLE.criterion(TrainConfig(), [0, 1], 2).weight is None
    assert SINGLE.probe_target(3).shape == ()


def test_multi_label_loss_is_bce_against_multi_hot_targets():
    loss = MULTI.criterion(TrainConfig(), [0, 1], 3)
    assert isinstance(loss, nn.BCEWithLogitsLoss)
    assert MULTI.probe_target(3).tolist() == [0.0, 0.0, 0.0]
    logits, targets = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert loss(logits, targets).item() == pytest.approx(nn.functional.binary_cross_entropy_with_logits(
        logits, targets).item())


# ---- the metrics ----

def test_each_task_counts_its_own_right_decisions():
    logits = torch.tensor([[3.0, -1.0, 1.0], [-2.0, 2.0, -1.0]])
    assert SINGLE.agreement(logits, torch.tensor([0, 2])) == 0.5
    assert SINGLE.agreement(logits, torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])) == 0.5  # soft: dominant class
    # Six decisions at 0.5, five right: image 0 calls class 2 (logit 1.0) that it does not have.
    assert MULTI.agreement(logits, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])) == pytest.approx(5 / 6)
    stats = {"train_loss": 0.3, "train_acc": 0.5}
    assert SINGLE.train_metrics(stats) == stats and MULTI.train_metrics(stats) == {"train_loss": 0.3}


def _loader(targets: torch.Tensor) -> DataLoader:
    images = torch.randn(len(targets), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(images, targets), batch_size=4)


def test_each_validation_pass_reports_its_metric_keys(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    stats, predictions = SINGLE.validate(accelerator, model, _loader(torch.tensor([0, 1, 2] * 3)),
                                         nn.CrossEntropyLoss(), NAMES)
    assert set(stats) == {*SINGLE.val_keys, "val_images"} - {"val_top5"}  # top-5 needs five classes
    assert len(predictions.labels) == 9 and stats["val_images"] == 9
    assert predictions.probs.shape == (9, 3) and np.allclose(predictions.probs.sum(1), 1)  # what went wrong
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]] * 3)
    stats, predictions = MULTI.validate(accelerator, model, _loader(targets), nn.BCEWithLogitsLoss(), NAMES)
    assert set(stats) == {*MULTI.val_keys, "val_images"}
    assert predictions.labels.shape == predictions.probs.shape == (9, 3) and len(predictions.thresholds) == 3
    assert set(stats["val_thresholds"]) == set(NAMES)
    # The EMA weights' copies of these keys: every key a validation pass reports but the image count.
    assert set(prefixed(stats)) == {f"ema_{k}" for k in MULTI.val_keys}


def test_each_report_holds_its_metrics_and_prints_its_table():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    truth = SINGLE.truth([0, 1, 2, 1], None)
    report = SINGLE.report(scores, truth, NAMES) | {"source": "here"}
    assert report["accuracy"] == 0.75 and report["confusion_matrix"][1] == [1, 1, 0]
    assert report["loss"] == pytest.approx(-torch.tensor([0.7, 0.8, 0.4, 0.3]).double().log().mean().item())
    lines = SINGLE.report_lines(report, {"metrics": {"val_acc": 0.5}, "epoch": 3}, "val")
    assert lines[:2] == ["accuracy 0.7500 on 4 images (here), macro F1 0.7778",
                         "the checkpoint recorded val_acc 0.5000 at epoch 3"]
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    thresholds = MULTI.thresholds({"class_names": NAMES, "thresholds": [0.5, 0.25, 0.35]})
    report = MULTI.report(scores, MULTI.truth([0, 1, 0, 0], targets), NAMES, thresholds) | {"source": "here"}
    assert {"map", "micro_f1", "macro_f1", "loss"} <= set(report) and "confusion_matrix" not in report
    assert report["per_class"]["green"]["threshold"] == 0.25
    lines = MULTI.report_lines(report, {"metrics": {"val_map": 0.5}, "epoch": 3}, "val")
    assert lines[1].startswith("the checkpoint recorded val_map 0.5000 at epoch 3")
    assert lines[2].split() == ["class", "precision", "recall", "f1", "AP", "threshold", "support"]


# ---- the best epoch ----

def test_each_task_allows_its_own_best_metrics_and_knows_their_direction():
    assert SINGLE.best("val_acc").higher_is_better and not SINGLE.best("val_loss").higher_is_better
    assert MULTI.best("val_map").higher_is_better and not MULTI.best("val_loss").higher_is_better
    assert MULTI.best("val_map").better(0.9, 0.8) and not MULTI.best("val_map").better(0.8, 0.8)  # a tie is not
    with pytest.raises(ConfigError, match="^train.best_metric = 'val_map' is not a metric of data.task = single; "
                                          "use one of: 'val_loss', 'val_acc'$"):
        SINGLE.best("val_map")
    # The schema accepts exactly what some task allows; the run's task narrows it.
    choices = _fields(TrainConfig)["best_metric"].metadata["choices"]
    assert set(choices) == {m for task in TASKS.values() for m in task.best_metrics}


def test_the_run_config_refuses_a_best_metric_of_the_other_task():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", "train.best_metric=val_map"])
    assert str(err.value) == ("train.best_metric = 'val_map' is not a metric of data.task = single; use one of: "
                              "'val_loss', 'val_acc'")
    cfg = load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", *MULTILABEL, "train.best_metric=val_map"])
    assert task_for(cfg) is TASKS["multilabel"]


def test_val_map_picks_the_highest_map_and_the_better_weights_and_spends_patience():
    history = RunHistory(MULTI.best("val_map"))
    # (raw mAP, EMA mAP, raw loss): epoch 2 has the lowest loss but not the best mAP.
    for epoch, (raw, ema, loss) in enumerate([(0.6, 0.7, 0.9), (0.65, 0.5, 0.4), (0.8, 0.75, 0.6)], 1):
        history.record({"epoch": epoch, "val_map": raw, "ema_val_map": ema, "val_loss": loss})
    assert [e["is_best"] for e in history.epochs] == [True, False, True]
    assert [e["best_weights"] for e in history.epochs] == ["ema", "raw", "raw"]
    assert better_weights({"val_map": 0.6, "ema_val_map": 0.7}, MULTI.best("val_map")) == "ema"
    assert history.best["epoch"] == 3 and history.epochs_without_improvement == 0
    history.record({"epoch": 4, "val_map": 0.79, "val_loss": 0.1})
    assert history.patience_spent(1) and not history.patience_spent(2)
    # A resumed run continues the same rule from the saved history.
    again = RunHistory.from_state(MULTI.best("val_map"), json.loads(json.dumps(history.to_state())))
    assert not again.record({"epoch": 5, "val_map": 0.8, "val_loss": 0.05})  # a tie with the best
    assert again.record({"epoch": 6, "val_map": 0.81, "val_loss": 0.5})


# ---- a checkpoint's predictions ----

def test_scores_thresholds_and_what_files_outside_the_run_record():
    logits = torch.tensor([[2.0, 0.0, -2.0]])
    assert SINGLE.scores(logits).sum().item() == pytest.approx(1.0)
    assert torch.equal(MULTI.scores(logits), torch.sigmoid(logits))  # each class on its own
    meta = {"class_names": NAMES, "thresholds": [0.3, 0.5, 0.7], "task": "multilabel"}
    assert SINGLE.thresholds(meta) is None and SINGLE.recorded(meta) == {"task": "single"}
    assert MULTI.thresholds(meta).tolist() == [0.3, 0.5, 0.7] and MULTI.thresholds(meta).dtype == torch.float64
    assert MULTI.thresholds({"class_names": NAMES}).tolist() == [0.5] * 3  # none recorded
    assert MULTI.recorded(meta) == {"task": "multilabel", "thresholds": [0.3, 0.5, 0.7]}


def test_prediction_columns_one_class_or_every_class_at_its_threshold():
    class Preds:
        paths = [Path("a.png"), Path("b.png")]
        probs = torch.tensor([[0.4, 0.9, 0.2], [float("nan")] * 3])
        errors = {1: "OSError: truncated"}

    header, rows = MULTI.prediction_rows(Preds, NAMES, 2, torch.tensor([0.35, 0.5, 0.5], dtype=torch.float64))
    assert header == ["path", "labels", "scores_top2", "error"]
    assert rows == [["a.png", "green;blue", "green:0.9000;blue:0.4000", ""], ["b.png", "", "", "OSError: truncated"]]
    header, rows = SINGLE.prediction_rows(Preds, NAMES, 5)
    assert header == ["path", "class", "probability", "top3", "error"]
    assert rows == [["a.png", "green", "0.900000", "green:0.9000;blue:0.4000;red:0.2000", ""],
                    ["b.png", "", "", "", "OSError: truncated"]]


# ---- a whole run ----

def test_a_multilabel_run_keeps_the_epoch_with_the_highest_map_across_a_resume(tmp_path, capsys,
                                                                               fresh_accelerate_state):
    from trainer.files.model_file import read_metadata
    from trainer.fit.loop import train

    folder = make_multilabel_folder(tmp_path / "data", count=40)
    run_dir = tmp_path / "run"
    # A high learning rate makes the tiny CNN's mAP go up and down: here (CPU, seed 0) val_map 0.73, 0.60,
    # 0.91 while val_loss falls every epoch, so val_loss would have called epoch 2 an improvement.
    overrides = [f"data.root={folder}", *MULTILABEL, "model.name=tiny_cnn", "data.image_size=16",
                 "data.num_workers=0", "data.batch_size=8", "optim.lr=0.3", "train.best_metric=val_map",
                 "runtime.device=cpu", f"run.dir={run_dir}", "wandb.mode=disabled", "data.audit=off"]
    train(load_config(None, [*overrides, "train.epochs=2"]))
    reset_accelerate_state()  # a second run in this process, as a relaunch would start
    result = train(load_config(None, [*overrides, "train.epochs=3", "run.resume=auto"]))
    maps = [e["val_map"] for e in result.history]
    assert len(maps) == 3
    best = maps.index(max(maps)) + 1  # the first epoch with the highest mAP: a tie is no improvement
    assert result.best["epoch"] == best
    assert [e["is_best"] for e in result.history] == [m > max(maps[:i], default=-1) for i, m in enumerate(maps)]
    meta = read_metadata(run_dir / "best.safetensors")
    assert meta["epoch"] == best and meta["metrics"]["val_map"] == max(maps)
    out = capsys.readouterr().out
    assert "resumed from" in out and f"of epoch {best}, chosen by train.best_metric: val_map {max(maps):.4f}" in out
