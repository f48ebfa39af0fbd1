"""Bounds from the machine and the model: data.num_workers capped at what the cores and memory allow
(trainer/assemble/accelerator.py), data.image_size checked against the model before anything is
written (trainer/assemble/size_probe.py) and at most MAX_IMAGE_SIZE (configs/schema.py)."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from configs.errors import ConfigError
from helpers import REPO, run_in_process
from models import HeadSpec, build_classifier
from trainer.assemble import accelerator as acc
from trainer.assemble.run_config import load_config
from trainer.assemble.size_probe import check_image_size, smallest_size

GiB = 2**30


@pytest.mark.parametrize("cores, memory, local, limit", [
    (2, 20 * GiB, 1, 2),  # the cores bind
    (64, 8 * GiB, 1, 16),  # the memory binds: 512 MiB per worker
    (64, 8 * GiB, 4, 4),  # shared by the training processes on the machine
    (16, None, 2, 16),  # memory unknown: the cores alone
    (8, 100 * 2**20, 1, 0),  # almost no memory: loading in the training process
])
def test_worker_limit_comes_from_cores_and_memory(cores, memory, local, limit):
    assert acc.worker_limit(cores, memory, local) == limit


def test_too_many_workers_are_capped_with_one_note(monkeypatch):
    monkeypatch.setattr(acc, "available_cores", lambda: 2)
    monkeypatch.setattr(acc, "available_memory", lambda: 20 * GiB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert acc.worker_count(1000) == (2, "data.num_workers=1000 is more than this machine allows (2 cores, 20.0 "
                                         "GiB of memory free, 1 training process(es)); using 2 worker processes "
                                         "per training process")
    assert acc.worker_count(2) == (2, None)
    assert acc.worker_count(0) == (0, None)
    assert acc.worker_count("auto") == (1, None)
    monkeypatch.setattr(acc, "available_cores", lambda: 64)
    monkeypatch.setattr(acc, "available_memory", lambda: 4 * GiB)
    assert acc.worker_count("auto") == (8, None)  # the memory's bound, not 63


def test_image_size_has_a_maximum(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.image_size must be at most 4096 px \(got 100000\)"):
        load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", "data.image_size=100000"])


@pytest.mark.parametrize("works, failed, native, smallest", [
    (lambda s: s >= 63, 32, None, 63),  # AlexNet: pooling shrinks smaller images to nothing
    (lambda s: s >= 32, 16, None, 32),  # VGG
    (lambda s: s == 224, 64, 224, 224),  # a ViT made for 224 px
    (lambda s: s == 224, 256, 224, 224),  # ... asked for more
    (lambda s: False, 32, None, None),  # fails at any size: not the size
    (lambda s: s >= 5000, 32, None, None),  # beyond the search
])
def test_the_smallest_size_a_model_runs_on(works, failed, native, smallest):
    assert smallest_size(works, failed, native) == smallest


def test_the_probe_leaves_the_model_as_it_was():
    built = build_classifier("tiny_cnn", 3, HeadSpec("linear", 8, 0.0), False, "", 0.0)
    built.model.train()
    built.model.get_submodule(built.head_name).eval()  # a mode of its own must survive too
    modes = [m.training for m in built.model.modules()]
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    rng = torch.get_rng_state()
    cpu = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    check_image_size(built, 16, cpu)
    assert [m.training for m in built.model.modules()] == modes
    after = built.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in built.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_image_size_the_model_cannot_take_is_one_line_with_nothing_written(image_folder, tmp_path):
    # The recipe a new user tries first, at a size AlexNet's pooling shrinks to nothing.
    run_dir = tmp_path / "run"
    r = run_in_process("train.py", "--config", str(REPO / "configs" / "cats_dogs_alexnet.toml"),
                       f"data.root={image_folder}", f"run.dir={run_dir}", "model.pretrained=false",
                       "data.image_size=32", "runtime.device=cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model torchvision/alexnet needs images of at least 63 px; data.image_size=32 is too small (Given "
        "input size: (256x1x1). Calculated output size: (256x0x0). Output size is too small): set "
        "data.image_size=63 or more")
    assert not run_dir.exists()
