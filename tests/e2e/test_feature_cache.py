"""Cached-feature training of a frozen backbone matches the uncached path, and the cache is reused."""

import pytest
from safetensors import safe_open

from trainer.files.model_file import load_classifier
from trainer.assemble.run_config import load_config
from trainer.fit.loop import train


def _run(image_folder, tmp_path, name, cached: bool):
    cfg = load_config(None, [
        f"data.root={image_folder}", f"run.dir={tmp_path / name}", "model.name=tiny_cnn", "model.freeze=backbone",
        "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.augment=none", "train.epochs=3",
        "optim.lr=0.05", "train.precision=no", "runtime.device=cpu", f"train.cache_features={str(cached).lower()}",
        f"train.feature_cache_dir={tmp_path / 'cache'}"])
    return train(cfg)


def test_cached_and_uncached_frozen_training_reach_the_same_metrics(image_folder, tmp_path):
    plain = _run(image_folder, tmp_path, "plain", cached=False)
    cached = _run(image_folder, tmp_path, "cached", cached=True)
    for a, b in zip(plain.history, cached.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    with safe_open(str(cache_file), "pt") as f:
        assert len(f.keys()) == 36  # one feature vector per image, train and val
    # The cached run's checkpoint is a whole classifier, not just the head.
    a = load_classifier(plain.run_dir / "last.safetensors").model.state_dict()
    b = load_classifier(cached.run_dir / "last.safetensors").model.state_dict()
    assert a.keys() == b.keys()
    assert (cached.run_dir / "predictions.png").is_file()  # the grid shows images, not features
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)

    # A second run reuses the file instead of recomputing it.
    before = cache_file.stat().st_mtime_ns
    _run(image_folder, tmp_path, "again", cached=True)
    assert cache_file.stat().st_mtime_ns == before
