"""Whole tiny in-process trainings on CPU: bf16, accumulation, channels_last, non-finite losses."""

from __future__ import annotations

import signal

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from helpers import precision_config, reset_accelerate_state
from models.registry import MODELS
from trainer.files.model_file import read_metadata
from trainer.fit.loop import train
from trainer.fit.step import NonFiniteLoss


# Accelerate keeps process-wide singletons; each in-process run starts from scratch (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_bf16_training_on_cpu(images, tmp_path):
    result = train(precision_config(images, tmp_path / "run", "train.precision=bf16", "train.epochs=1", "data.batch_size=16",
                        "runtime.device=cpu"))
    meta = read_metadata(result.run_dir / "last.safetensors")
    assert meta["precision"] == "bf16" and meta["device"] == "cpu"
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    # Autocast must really run the convolutions in bf16, not silently fall back to fp32.
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    with accelerator.autocast():
        assert nn.Conv2d(3, 4, 3)(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16


# ---- accumulation, clipping, channels_last ----

def test_accumulating_two_batches_of_8_matches_one_batch_of_16(images, tmp_path):
    common = ("train.epochs=2", "optim.scheduler=cosine", "optim.warmup_epochs=1")
    big = train(precision_config(images, tmp_path / "big", "data.batch_size=16", *common))
    reset_accelerate_state()
    accumulated = train(precision_config(images, tmp_path / "acc", "data.batch_size=8", "train.grad_accum_steps=2",
                                        *common))
    for a, b in zip(big.history, accumulated.history):
        assert a["optimizer_steps"] == b["optimizer_steps"] == 3
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    wa, wb = load_file(big.run_dir / "last.safetensors"), load_file(accumulated.run_dir / "last.safetensors")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, f"weights differ by {worst}"
    assert read_metadata(accumulated.run_dir / "last.safetensors")["global_batch_size"] == "16"


def test_channels_last_option_trains(images, tmp_path):
    result = train(precision_config(images, tmp_path / "run", "runtime.channels_last=true", "train.epochs=1",
                        "data.batch_size=16", "model.name=tiny_cnn"))
    assert result.history[0]["optimizer_steps"] == 3


class _NanInSecondEpoch(nn.Module):
    """Finite for the first epoch's 3 training batches, NaN from the 4th on."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, num_classes)
        self.calls = 0

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls > 3:
                out = out * float("nan")
        return out


if "nan_in_epoch_2_test" not in MODELS:
    MODELS.register("nan_in_epoch_2_test")(lambda num_classes=3: _NanInSecondEpoch(num_classes))


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_last_good_checkpoint(images, tmp_path):
    cfg = precision_config(images, tmp_path / "run", "model.name=nan_in_epoch_2_test", "train.epochs=3", "data.batch_size=16")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(NonFiniteLoss, match=r"loss is not finite .* at epoch 2, step 1") as caught:
        train(cfg)
    # The trainer's "checkpoint on SIGTERM" handler goes with the failed run (forked workers of
    # later work in this process would inherit it and ignore Pool.terminate).
    assert signal.getsignal(signal.SIGTERM) is handler
    assert caught.value.exit_code != 0
    last = tmp_path / "run" / "last.safetensors"
    assert read_metadata(last)["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(last).values())
