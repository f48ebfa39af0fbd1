"""One assembly: the trainer and the diagnostic tools build the same run from the same config."""

from __future__ import annotations

import torch

import trainer.fit.diagnostics as diagnostics
import trainer.fit.loop as loop
from trainer.assemble.run_config import load_config

# Dataset statistics, extra augmentation ops and the audit: the settings the old LR finder dropped.
SETTINGS = ["model.name=tiny_cnn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
            "data.normalize=dataset", 'data.augment_ops=["color_jitter(brightness=0.3)", "random_erasing(p=0.5)"]',
            "data.audit=on", "train.epochs=1", "optim.lr=0.01", "runtime.device=cpu"]


def _first_batch_of(run, monkeypatch, module, name) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        if not seen:
            images, labels = [a for a in args if isinstance(a, torch.Tensor)][:2]
            seen.append((images.clone(), labels.clone()))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    run()
    monkeypatch.setattr(module, name, original)
    return seen[0]


def test_lr_finder_and_overfit_check_see_the_trainers_first_batch(image_folder, tmp_path, monkeypatch):
    cfg = load_config(None, [f"data.root={image_folder}", f"run.dir={tmp_path / 'run'}", *SETTINGS])
    trained = _first_batch_of(lambda: loop.train(cfg), monkeypatch, loop, "train_step")
    swept = _first_batch_of(lambda: diagnostics.lr_sweep(cfg, 1e-4, 1e-2, 3), monkeypatch,
                            diagnostics.Prepared, "step")
    fitted = _first_batch_of(lambda: diagnostics.overfit_one_batch(cfg, 2), monkeypatch, diagnostics.Prepared, "step")
    for images, labels in (swept, fitted):
        assert torch.equal(images, trained[0]) and torch.equal(labels, trained[1])
    # Normalized with the training split's own statistics: not ImageNet's, and not left out.
    assert abs(trained[0].mean().item()) < 1.5


def test_lr_finder_keeps_the_backbone_ratio_and_starts_from_the_configured_rates(image_folder, tmp_path):
    cfg = load_config(None, [f"data.root={image_folder}", f"run.dir={tmp_path / 'run'}", *SETTINGS,
                             "optim.backbone_lr_mult=0.1", "optim.scheduler=cosine", "optim.warmup_epochs=1"])
    sweep = diagnostics.lr_sweep(cfg, 1e-4, 1e-2, 4)
    assert sweep.ratios == [1.0, 0.1] and len(sweep.lrs) == len(sweep.losses) >= 3
    assert not (tmp_path / "run").exists()  # the tools write nothing into the run folder
