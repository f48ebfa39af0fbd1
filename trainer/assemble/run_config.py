"""A run's config as every entry point reads it: the schema's checks plus the rules that belong to
the data and model layers. Kept apart from `run_parts` so that reading a config imports no
optimizer, batch-size search or W&B."""

from __future__ import annotations

from pathlib import Path

from configs.schema import Config, read_config
from models.finetune import check_finetune_config
from trainer.task.best_metric import best_metric_of


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    cfg = read_config(path, overrides)
    if cfg.data.augment_ops:  # they are checked by building them: torchvision only when there are some
        from data.transforms import check_augment_ops

        check_augment_ops(cfg.data.augment_ops, cfg.data.image_size)
    check_finetune_config(cfg)
    best_metric_of(cfg)  # train.best_metric must be a metric of the run's task
    return cfg
