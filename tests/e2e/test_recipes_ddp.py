"""model.bn = "frozen" under 2-process DDP (gloo, CPU): a real `accelerate launch` run whose BatchNorm
layers end exactly as they started, while the rest of the network trains."""

from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file

from helpers import REPO, accelerate_launch, make_image_folder, run_env
from models import build_classifier


def test_frozen_batchnorm_stays_frozen_under_ddp(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=8)
    run_dir = tmp_path / "run"
    cmd = [*accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"),
           str(REPO / "launch" / "train.py"), f"data.root={images}", f"run.dir={run_dir}", "model.name=tiny_cnn",
           "model.bn=frozen", "data.image_size=16", "data.batch_size=4", "data.num_workers=0", "data.augment=none",
           "train.epochs=1", "optim.lr=0.05"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp (gloo)" in result.stdout and "BatchNorm trains" not in result.stdout
    weights = load_file(str(run_dir / "last.safetensors"))
    # tiny_cnn's BatchNorm layers start at the identity: statistics 0 and 1, scale 1, shift 0.
    for layer in ("features.4", "features.8"):
        assert torch.equal(weights[f"{layer}.running_mean"], torch.zeros_like(weights[f"{layer}.running_mean"]))
        assert torch.equal(weights[f"{layer}.running_var"], torch.ones_like(weights[f"{layer}.running_var"]))
        assert torch.equal(weights[f"{layer}.weight"], torch.ones_like(weights[f"{layer}.weight"]))
        assert torch.equal(weights[f"{layer}.bias"], torch.zeros_like(weights[f"{layer}.bias"]))
        assert int(weights[f"{layer}.num_batches_tracked"]) == 0
    torch.manual_seed(0)  # train.seed: the run's initial weights
    initial = build_classifier("tiny_cnn", 3).model
    assert not torch.equal(weights["features.0.weight"], initial.features[0].weight)  # the convolutions trained
