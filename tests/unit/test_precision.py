"""Precision, accumulation, clipping, non-finite losses and the runtime's decisions, in-process on CPU.

CUDA-only checks (gradient scaler bookkeeping, DataParallel selection) skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from helpers import precision_config, reset_accelerate_state
from configs.errors import ConfigError
from trainer.assemble.accelerator import (cpu_has_native_bf16, precision_asked, cpu_thread_count, make_accelerator, prepare_model, resolve_cpu,
                             resolve_parallel, resolve_precision)
from trainer.fit.step import StepCounters, StepOptions, StepParts, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# Accelerate keeps process-wide singletons; each in-process run starts from scratch (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---- decisions, table-driven ----

@pytest.mark.parametrize("requested, on_cpu, native, expected, note", [
    ("fp16", True, True, "bf16", "fp16 needs a GPU"),
    ("fp16", True, False, "no", "running fp32 instead"),
    ("bf16", True, False, "bf16", "no native bf16"),
    ("bf16", True, True, "bf16", None),
    ("no", True, False, "no", None),
    ("fp16", False, False, "fp16", None),
    ("bf16", False, False, "bf16", None),
])
def test_resolve_precision(requested, on_cpu, native, expected, note):
    precision, message = resolve_precision(requested, on_cpu, native)
    assert precision == expected
    assert (message is None) if note is None else (note in message)


@pytest.mark.parametrize("parallel, on_cpu, gpus, procs, use_dp, note", [
    ("dp", False, 4, 1, True, None),
    ("dp", False, 1, 1, False, "needs at least two visible GPUs; 1 GPU here"),
    ("dp", True, 0, 1, False, "no GPU here, running on one device"),
    ("auto", False, 2, 1, False, "--num_processes 2"),
    ("auto", False, 2, 2, False, None),
    ("ddp", True, 0, 1, False, "only one process was launched"),
    ("ddp", True, 0, 2, False, None),
    ("auto", True, 0, 1, False, None),
])
def test_resolve_parallel(parallel, on_cpu, gpus, procs, use_dp, note):
    dp, message = resolve_parallel(parallel, on_cpu, gpus, procs)
    assert dp is use_dp
    assert (message is None) if note is None else (note in message)


def test_dp_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match="runtime.parallel = 'dp' is one process"):
        resolve_parallel("dp", False, 4, 2)


@pytest.mark.parametrize("configured, cores, local, expected", [
    (0, 2, 2, 1), (0, 2, 1, 2), (0, 16, 4, 4), (0, 3, 4, 1), (6, 16, 4, 6)])
def test_cpu_threads_share_the_cores(configured, cores, local, expected):
    assert cpu_thread_count(configured, cores, local) == expected


def test_cuda_requested_without_gpu_fails_clearly():
    if torch.cuda.is_available():
        assert resolve_cpu("cuda", True) is False
    with pytest.raises(ConfigError, match="runtime.device = 'cuda' but no CUDA GPU"):
        resolve_cpu("cuda", False)
    assert resolve_cpu("cpu", True) is True and resolve_cpu("auto", False) is True


@pytest.mark.parametrize("bad", ["train.grad_accum_steps=0", "train.grad_clip_norm=-1", "runtime.cpu_threads=-2",
                                 "runtime.parallel=fsdp", "runtime.device=tpu"])
def test_runtime_keys_are_validated(images, tmp_path, bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        precision_config(images, tmp_path / "run", bad)


# ---- precision on this machine ----

def test_fp16_on_cpu_says_so_and_never_runs_silently(images, tmp_path, capsys):
    accelerator = make_accelerator(precision_config(images, tmp_path / "run", "train.precision=fp16"))
    err = capsys.readouterr().err
    assert "note: fp16 needs a GPU" in err
    expected = "bf16" if cpu_has_native_bf16() else "no"
    assert accelerator.mixed_precision == expected
    assert ("running bf16" if expected == "bf16" else "running fp32") in err


def test_fp16_from_accelerate_launch_flag_is_resolved_too(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `--mixed_precision fp16` exports
    accelerator = make_accelerator(precision_config(images, tmp_path / "run"))
    assert accelerator.mixed_precision != "fp16"
    assert "note: fp16 needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("configured, launcher, runs, note", [
    ("auto", "bf16", "bf16", None),  # auto follows the launcher
    ("auto", None, "no", None),
    ("no", "bf16", "no", "train.precision = 'no' (config) wins over accelerate launch --mixed_precision bf16"),
    ("bf16", "fp16", "bf16", "wins over accelerate launch --mixed_precision fp16"),
    ("bf16", "no", "bf16", None),  # the launcher's default says nothing
])
def test_config_and_launcher_precision_say_which_won(configured, launcher, runs, note):
    asked, said = precision_asked(configured, launcher)
    assert asked == runs
    assert (said is None) if note is None else (note in said)


def test_the_config_records_the_precision_that_ran(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = precision_config(images, tmp_path / "run", "train.precision=auto")
    accelerator = make_accelerator(cfg)
    assert cfg.train.precision == accelerator.mixed_precision == "bf16"  # not "auto": a re-run trains the same
    assert 'precision = "bf16"' in cfg.to_toml()


def _one_sgd_update(clip: float) -> float:
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    counters = StepCounters()
    parts = StepParts(accelerator, model, optimizer, scheduler, nn.CrossEntropyLoss(), StepOptions(grad_clip_norm=clip))
    train_step(parts, torch.randn(4, 10) * 100, torch.tensor([0, 1, 2, 0]), counters, 0)
    assert counters.optimizer_steps == 1 and scheduler.last_epoch == 1
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (after - before).norm().item()


def test_gradient_clipping_bounds_the_update():
    # With plain SGD at lr 1 the update is the (clipped) gradient itself.
    assert _one_sgd_update(0.0) > 1.0
    assert _one_sgd_update(1e-3) == pytest.approx(1e-3, rel=1e-4)


# ---- CUDA only ----

@needs_cuda
def test_fp16_gradient_scaler_skips_overflowing_steps_and_counts_them():
    accelerator = Accelerator(mixed_precision="fp16")
    model = nn.Linear(8, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    scale = accelerator.scaler.get_scale()
    counters = StepCounters()
    x, y = torch.randn(4, 8, device=accelerator.device), torch.tensor([0, 1, 0, 1], device=accelerator.device)

    def overflowing_loss(logits, labels):  # finite loss, gradients beyond fp16's range once scaled
        return nn.functional.cross_entropy(logits, labels) * 1e6

    scaled = StepParts(accelerator, model, optimizer, scheduler, overflowing_loss, StepOptions(grad_clip_norm=1.0))
    train_step(scaled, x, y, counters, 0)
    assert counters.skipped_steps == 1 and counters.optimizer_steps == 0
    assert scheduler.last_epoch == 0  # the schedule waits for a real step
    assert accelerator.scaler.get_scale() < scale
    plain = StepParts(accelerator, model, optimizer, scheduler, nn.CrossEntropyLoss(), StepOptions())
    train_step(plain, x, y, counters, 1)
    assert counters.optimizer_steps == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_dataparallel_is_used_when_asked_with_two_gpus(images, tmp_path):
    cfg = precision_config(images, tmp_path / "run", "runtime.parallel=dp")
    accelerator = make_accelerator(cfg)
    model = prepare_model(nn.Linear(4, 2), accelerator, cfg)
    assert isinstance(model, nn.DataParallel) and len(model.device_ids) == torch.cuda.device_count()
