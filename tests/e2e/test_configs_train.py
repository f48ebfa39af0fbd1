"""Every recipe in configs/ loads and trains a step: tiny images, no pretrained download."""

from pathlib import Path

import pytest

from helpers import REPO, make_image_folder
from trainer.assemble.run_config import load_config
from trainer.fit.loop import train

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_one_tiny_epoch(path: Path, tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=3, classes=("red", "green"), size=24)
    # 64 px: AlexNet's stride-4 stem and pools need more than the 16 px other tests use.
    cfg = load_config(path, [f"data.root={root}", f"run.dir={tmp_path / 'run'}", "model.pretrained=false",
                             "data.image_size=64", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
                             "train.precision=no", "wandb.mode=disabled", "data.val_fraction=0.34"])
    result = train(cfg)
    assert len(result.history) == 1
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert result.history[0]["trainable_params"] > 0
