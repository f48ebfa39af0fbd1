"""The EMA of the weights (trainer/fit/ema.py): its decay, its update, when the step loop calls it, how
an epoch picks raw or EMA weights, the model files and the resume check. In-process, on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from configs.errors import ConfigError, UsageError
from configs.schema import Config, read_config
from data.transforms import Preprocessing
from models import HeadSpec, build_classifier
from trainer.fit.ema import WeightEma, check_resumable, file_metrics
from trainer.fit.loop import save_model_files
from trainer.files.model_file import ClassifierFacts, load_classifier, read_metadata
from trainer.fit.history import RunHistory
from trainer.task.task import SingleLabel
from trainer.files.checkpoints import COMPLETE, DamagedCheckpoint, load_checkpoint, save_checkpoint, verify
from trainer.fit.step import StepCounters, StepOptions, StepParts, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
CLASSES = ["blue", "green", "red"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


@pytest.mark.parametrize("warmup, updates, expected", [
    (True, 0, 0.1), (True, 8, 0.5), (True, 90, 0.91), (True, 10**6, 0.9998), (False, 0, 0.9998),
])
def test_decay_warms_up_as_one_plus_n_over_ten_plus_n(warmup, updates, expected):
    ema = WeightEma(nn.Linear(2, 2), 0.9998, warmup)
    ema.updates = updates
    assert ema.current_decay() == pytest.approx(expected)


def test_update_averages_parameters_copies_buffers_and_skips_frozen_ones():
    model = _model()
    ema = WeightEma(model, 0.9, warmup=False)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    model[0].weight.requires_grad_(False)  # frozen: stays what it is in both
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 6))  # moves the BatchNorm statistics and its counter
    ema.update()
    now, current = ema.state_dict(), model.state_dict()
    for key in ("0.bias", "2.weight", "2.bias", "1.weight"):
        assert torch.allclose(now[key], 0.9 * start[key] + 0.1 * current[key], atol=1e-6), key
    assert torch.equal(now["0.weight"], start["0.weight"])
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(now[key], current[key]), key
    assert ema.updates == 1 and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_the_ema_state_round_trips():
    model = _model()
    ema = WeightEma(model, 0.9)
    with torch.no_grad():
        model[2].weight.mul_(3)
    ema.update()
    other = WeightEma(_model(), 0.9)
    other.load(ema.state_dict(), ema.to_state())
    assert other.updates == 1 and other.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values()))


def _steps(accelerator: Accelerator, micro_batches: int) -> tuple[StepCounters, WeightEma]:
    model = nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = WeightEma(model, 0.5, warmup=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator, model, optimizer, scheduler, nn.CrossEntropyLoss(), StepOptions(), ema)
    counters = StepCounters()
    for i in range(micro_batches):
        train_step(parts, torch.randn(4, 10, device=accelerator.device),
                   torch.tensor([0, 1, 2, 0], device=accelerator.device), counters, i)
    return counters, ema


def test_the_ema_updates_once_per_optimizer_step_not_per_micro_batch():
    counters, ema = _steps(Accelerator(cpu=True, gradient_accumulation_steps=2), 6)
    assert counters.optimizer_steps == 3 and ema.updates == 3


@needs_cuda
def test_fp16_overflow_skipped_steps_leave_the_ema_alone():
    accelerator = Accelerator(mixed_precision="fp16")
    model = nn.Linear(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = WeightEma(model.to(accelerator.device), 0.5, warmup=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = torch.randn(4, 8, device=accelerator.device), torch.tensor([0, 1, 0, 1], device=accelerator.device)

    def overflowing_loss(logits, labels):  # finite loss, gradients beyond fp16's range once scaled
        return nn.functional.cross_entropy(logits, labels) * 1e6

    counters = StepCounters()
    before = [p.clone() for p in ema.module.parameters()]
    train_step(StepParts(accelerator, model, optimizer, scheduler, overflowing_loss, StepOptions(), ema), x, y,
               counters, 0)
    assert counters.skipped_steps == 1 and ema.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    train_step(StepParts(accelerator, model, optimizer, scheduler, nn.CrossEntropyLoss(), StepOptions(), ema), x, y,
               counters, 1)
    assert counters.optimizer_steps == 1 and ema.updates == 1


@pytest.mark.parametrize("best_metric, epochs, best_epoch, weights", [
    # val_acc: epoch 2's raw 0.7 beats epoch 1's raw 0.6 but not its EMA 0.8
    ("val_acc", [(0.6, 0.8), (0.7, 0.5)], 1, ["ema", "raw"]),
    ("val_acc", [(0.6, 0.6), (0.9, 0.7)], 2, ["raw", "raw"]),  # a tie keeps the raw weights
    ("val_loss", [(0.5, 0.4), (0.45, 0.3)], 2, ["ema", "ema"]),
])
def test_an_epoch_scores_by_its_better_weights(best_metric, epochs, best_epoch, weights):
    history = RunHistory(SingleLabel().best(best_metric))
    for epoch, (raw, ema) in enumerate(epochs, 1):
        history.record({"epoch": epoch, best_metric: raw, f"ema_{best_metric}": ema})
    assert history.best["epoch"] == best_epoch
    assert [e["best_weights"] for e in history.epochs] == weights


def test_without_ema_the_history_is_unchanged():
    history = RunHistory(SingleLabel().best("val_loss"))
    history.record({"epoch": 1, "val_loss": 0.5})
    assert "best_weights" not in history.epochs[0]


def _facts() -> ClassifierFacts:
    return ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), CLASSES,
                           Preprocessing(16, 0.875, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "squash"), Config().to_dict())


@pytest.mark.parametrize("best", ["ema", "raw"])
def test_model_files_hold_the_weights_their_header_names(tmp_path, best):
    torch.manual_seed(0)
    model = build_classifier("tiny_cnn", len(CLASSES)).model
    ema = WeightEma(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    metrics = {"epoch": 3, "val_loss": 0.5, "val_acc": 0.6, "ema_val_loss": 0.4, "ema_val_acc": 0.8}
    save_model_files(tmp_path, {"raw": model, "ema": ema.module}, _facts(), metrics, best)
    for name, weights, module in [("last", "raw", model), ("ema", "ema", ema.module),
                                  ("best", best, ema.module if best == "ema" else model)]:
        path = tmp_path / f"{name}.safetensors"
        meta = read_metadata(path)
        assert meta["weights"] == weights, name
        assert meta["metrics"]["val_acc"] == float(meta["val_acc"]) == (0.8 if weights == "ema" else 0.6)
        loaded = load_classifier(path).model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in module.state_dict().items()), name
    # An epoch that did not improve rewrites last and ema only.
    (tmp_path / "best.safetensors").unlink()
    save_model_files(tmp_path, {"raw": model, "ema": ema.module}, _facts(), {**metrics, "epoch": 4}, None)
    assert not (tmp_path / "best.safetensors").exists() and read_metadata(tmp_path / "ema.safetensors")["epoch"] == 4


def test_resume_refuses_an_ema_mismatch_in_one_line():
    check_resumable({"decay": 0.99, "updates": 5}, 0.999)  # another decay: allowed (config_changes warns)
    check_resumable(None, 0.0)
    with pytest.raises(UsageError, match=r"^cannot resume: the checkpoint keeps EMA weights \(train.ema_decay = "
                                         r"0.99\) but train.ema_decay is 0; set train.ema_decay=0.99"):
        check_resumable({"decay": 0.99, "updates": 5}, 0.0)
    with pytest.raises(UsageError, match=r"^cannot resume: the checkpoint was trained without EMA weights but "
                                         r"train.ema_decay is 0.999; set train.ema_decay=0 to continue it"):
        check_resumable(None, 0.999)


def test_file_metrics_name_the_held_weights_val_metrics():
    metrics = {"epoch": 2, "val_loss": 0.5, "val_acc": 0.7, "ema_val_loss": 0.4, "ema_val_acc": 0.8}
    assert file_metrics(metrics, "raw") is metrics
    held = file_metrics(metrics, "ema")
    assert (held["val_loss"], held["val_acc"], held["raw_val_loss"], held["raw_val_acc"]) == (0.4, 0.8, 0.5, 0.7)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_ema_decay_outside_zero_to_one_is_refused(value, tmp_path):
    with pytest.raises(ConfigError, match=r"train.ema_decay must be in \[0, 1\)"):
        read_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", f"train.ema_decay={value}"])


def test_a_checkpoint_holds_the_ema_and_one_without_its_file_is_damaged(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = _model()
    ema = WeightEma(model, 0.9)
    ema.update()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"global_step": 1, "epoch": 1, "epoch_complete": False, "samples_done": 4, "history": [],
             "epochs_without_improvement": 0, "scheduler": {}, "class_names": ["a", "b"], "config": {},
             "ema": ema.to_state()}
    folder = save_checkpoint(accelerator, tmp_path, 1, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                             trainer_state=state, rank_tensors={"torch_cpu": torch.get_rng_state()}, rank_json={},
                             ema_state=ema.state_dict())
    loaded = load_checkpoint(folder, 0)
    assert loaded.state["ema"] == {"decay": 0.9, "warmup": True, "updates": 1}
    assert all(torch.equal(loaded.ema[k], v) for k, v in ema.state_dict().items())
    # A COMPLETE that does not list ema.safetensors, though state.json says there is an EMA.
    manifest = json.loads((folder / COMPLETE).read_text())
    del manifest["files"]["ema.safetensors"]
    (folder / COMPLETE).write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match="is not a complete"):
        verify(folder)
