"""Progressive unfreezing over whole runs with model.bn = "frozen": a real 2-process CPU DDP
`accelerate launch`, and one process in-process (the same training function; 1-process `accelerate
launch` runs are test_smoke_train.py's and test_reliability_inputs.py's). The backbone trains from
the unfreeze on, while its BatchNorm layers end exactly as they started, under DDP too."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import accelerate_launch, reset_accelerate_state, run_script
from models import build_classifier

OVERRIDES = ("model.name=tiny_cnn", "model.bn=frozen", "data.image_size=16", "data.batch_size=6",
             "data.num_workers=0", "train.epochs=3", "train.unfreeze_at_epoch=1", "optim.name=sgd", "optim.lr=0.05",
             "optim.backbone_lr_mult=0.1", "data.augment=none")


def _run(tmp_path, image_folder, name, processes):
    run_dir = tmp_path / name
    overrides = (f"data.root={image_folder}", f"run.dir={run_dir}", *OVERRIDES)
    if processes == 1:
        from trainer.assemble.run_config import load_config
        from trainer.fit.loop import train

        reset_accelerate_state()
        try:
            train(load_config(None, [*overrides, "runtime.device=cpu"]))
        finally:
            reset_accelerate_state()
    else:
        launcher = accelerate_launch("--num_processes", str(processes), "--mixed_precision", "no", "--multi_gpu")
        result = run_script("train.py", *overrides, cwd=tmp_path, launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "ddp (gloo)" in result.stdout and "BatchNorm trains" not in result.stdout
    return run_dir


@pytest.mark.parametrize("processes", [1, 2])
def test_progressive_unfreezing_with_frozen_batchnorm_under_accelerate(tmp_path, image_folder, processes):
    run_dir = _run(tmp_path, image_folder, f"p{processes}", processes)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["lr_backbone"] for h in history] == pytest.approx([0.0, 0.005, 0.005])
    assert [h["lr"] for h in history] == pytest.approx([0.05] * 3)
    head_params = history[0]["trainable_params"]
    assert history[1]["trainable_params"] == history[2]["trainable_params"] > head_params
    assert history[-1]["train_loss"] < history[0]["train_loss"]

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
