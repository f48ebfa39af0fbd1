"""End to end: `accelerate launch launch/train.py` from a folder outside the repository."""

import json

import torch
from safetensors import safe_open

from data import ImageListDataset, discover
from helpers import REPO, accelerate_launch, run_script
from trainer.files.model_file import load_classifier, read_metadata


def test_accelerate_launch_trains_and_checkpoint_reloads(image_folder, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = tmp_path / "run"
    result = run_script(
        "train.py", "--config", str(REPO / "configs" / "demo.toml"),
        f"data.root={image_folder}", f"run.dir={run_dir}", "model.name=tiny_cnn", "data.image_size=16",
        "data.batch_size=8", "data.num_workers=0", "train.epochs=3", "optim.lr=0.01", "optim.scheduler=none",
        "data.augment=none", "data.val_fraction=0.25",
        cwd=outside, launcher=accelerate_launch("--num_processes", "1", "--mixed_precision", "no", "--cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch  train_loss" in result.stdout and f"wrote {run_dir}/best.safetensors" in result.stdout
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_acc"] for h in history) > 1 / 3 + 0.2  # well above chance for 3 classes
    assert (run_dir / "config.toml").read_text().count("tiny_cnn") == 1

    meta = read_metadata(run_dir / "best.safetensors")
    assert meta["class_names"] == ["blue", "green", "red"]
    assert meta["config"]["model"]["name"] == "tiny_cnn"
    with safe_open(str(run_dir / "best.safetensors"), "pt") as f:
        assert 0.0 <= float(f.metadata()["val_acc"]) <= 1.0

    # The checkpoint alone rebuilds the model: its predictions on the validation split give back
    # exactly the accuracy recorded when it was written.
    last = load_classifier(run_dir / "last.safetensors")
    splits = discover(image_folder, val_fraction=0.25, seed=0)
    dataset = ImageListDataset(splits.val, last.eval_transform())
    images = last.preprocessing.normalize(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.tensor([label for _, label in splits.val])
    with torch.no_grad():
        predictions = last.model(images).argmax(1)
    assert (predictions == labels).double().mean().item() == last.metadata["metrics"]["val_acc"]
    assert last.metadata["metrics"]["val_acc"] == history[-1]["val_acc"]
