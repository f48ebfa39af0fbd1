"""Early stopping and best-epoch tracking over a whole (tiny) in-process training."""

import json

from trainer.assemble.run_config import load_config
from trainer.fit.loop import train


def test_early_stopping_stops_after_patience_epochs_without_improvement(image_folder, tmp_path):
    # A learning rate this small cannot change a prediction, so val_acc never improves after epoch 1.
    cfg = load_config(None, [f"data.root={image_folder}", "model.name=tiny_cnn", f"run.dir={tmp_path / 'run'}", "runtime.device=cpu",
                             "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=10",
                             "optim.lr=1e-12", "train.best_metric=val_acc", "train.early_stopping_patience=2"])
    result = train(cfg)
    assert result.stopped_early and len(result.history) == 3
    assert result.best["epoch"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["is_best"] for r in rows] == [True, False, False]
