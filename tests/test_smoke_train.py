"""End to end: `accelerate launch launch/train.py` from a folder outside the repository."""

import json

import torch
from safetensors import safe_open

from helpers import accelerate_launch, run_script
from trainer.checkpoint import load_classifier, read_metadata


def test_accelerate_launch_trains_and_checkpoint_reloads(image_folder, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", "--config", str(__import__("helpers").REPO / "configs" / "demo.toml"),
        f"data.root={image_folder}", f"run.dir={run_dir}", "model.name=tiny_cnn", "data.image_size=16",
        "data.batch_size=8", "data.num_workers=0", "train.epochs=6", "optim.lr=0.01", "optim.scheduler=none",
        "data.augment=none", "data.val_fraction=0.25",
        cwd=outside, launcher=accelerate_launch("--num_processes", "1", "--mixed_precision", "no", "--cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_acc"] for h in history) > 1 / 3 + 0.2  # well above chance for 3 classes

    meta = read_metadata(run_dir / "best.safetensors")
    assert meta["class_names"] == ["blue", "green", "red"]
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0
    with safe_open(str(run_dir / "best.safetensors"), "pt") as f:
        assert "val_acc" in f.metadata()

    loaded = load_classifier(run_dir / "last.safetensors")
    images = torch.rand(4, 3, 16, 16)
    again = load_classifier(run_dir / "last.safetensors")
    assert torch.equal(loaded.model(images), again.model(images))
