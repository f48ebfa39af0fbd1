"""Shared by the kill-and-resume tests (tests/e2e/test_resume_killed.py, test_resume_ddp.py): the tiny
run they train and how they compare runs bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMING = ("epoch_time", "images_per_sec", "train_seconds", "data_wait_seconds", "wall_time")


def tiny_run_args(image_folder: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={image_folder}", f"run.dir={run_dir}", "model.name=tiny_cnn", "data.image_size=16",
            "data.batch_size=4", "data.val_fraction=0.25", "train.epochs=3", "optim.lr=0.01",
            "optim.scheduler=cosine", "data.augment=standard", "train.checkpoint_every_steps=3",
            "train.keep_last=2", *extra]


def assert_same_bits(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and torch.equal(x[key].reshape(-1).view(torch.uint8), y[key].reshape(-1).view(torch.uint8)), key


def metrics_without_timing(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def step_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit())
