"""One way to build a run: config -> split -> audit -> transforms -> datasets -> loaders -> model
-> optimizer -> schedule -> criterion.

The training loop, the LR finder, the overfit check, the batch grid and evaluation of a run's own
split all call `build_run` (or its data half, `build_data`); none of them assembles its own.
"""

from __future__ import annotations

from pathlib import Path

from configs.schema import Config, read_config
from data.transforms import check_augment_ops
from models.finetune import check_finetune_config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The schema's checks plus the rules that belong to the data and model layers."""
    cfg = read_config(path, overrides)
    check_augment_ops(cfg.data.augment_ops, cfg.data.image_size)
    check_finetune_config(cfg)
    return cfg
