"""An exponential moving average (EMA) of the weights, as timm's `ModelEmaV3`, kept beside the model.

    ema = decay * ema + (1 - decay) * weights        after every optimizer step (`train.ema_decay`)

With `train.ema_warmup` the decay is min(ema_decay, (1 + n) / (10 + n)) at the n-th update (from 0),
so the average forgets the random or pretrained start within the first few hundred steps instead
of the ~1 / (1 - decay) steps a plain 0.9998 would take. (timm's `use_warmup` reaches the same end
with 1 - (1 + n) ** -2/3; this is TensorFlow's `ExponentialMovingAverage(num_updates=n)` ramp.)

Parameters are averaged; buffers (BatchNorm running statistics, counters) are copied from the
model, as timm's `exclude_buffers=True`: the running statistics are an average already. The copy
lives on the model's device, is never wrapped (DDP, compile) and updates in one fused
`torch._foreach_lerp_` per step, so it costs one pass over the weights and no host sync.

The loop evaluates it beside the raw weights every epoch (`ema_val_loss`, `ema_val_acc`, ...);
`best.safetensors` takes whichever of the two scores better by `train.best_metric` (its header's
`weights` says which), `last.safetensors` the raw weights and `ema.safetensors` the EMA ones. The
resumable checkpoints hold it as `ema.safetensors` plus its update count in state.json, so a
resumed run continues the same average bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from configs.errors import UsageError
from configs.schema import Config
from trainer.task.best_metric import BestMetric
from trainer.task.task import TASKS

PREFIX = "ema_"  # metric keys of the EMA weights: ema_val_loss, ema_val_acc, ema_val_top5
# What a validation pass reports, of every task (val_images is the same for both weights).
_VAL_KEYS = tuple(dict.fromkeys(k for task in TASKS.values() for k in task.val_keys))


class WeightEma:
    """The moving average of `model`'s weights (the whole classifier, unwrapped: bare key names)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.updates = 0  # optimizer steps averaged in so far (fp16 overflow-skipped steps are not)

    def current_decay(self) -> float:
        """The decay of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Average in the model's weights as they are now: call after each optimizer step."""
        # Parameters that do not train (a frozen backbone) equal their average exactly: skipping
        # them makes a head-only run pay for the head alone.
        pairs = [(e, p) for e, p in zip(self.module.parameters(), self.source.parameters()) if p.requires_grad]
        if pairs:
            averaged, current = (list(t) for t in zip(*pairs))
            torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(self.source.buffers()))
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def to_state(self) -> dict:
        """The JSON half of a checkpoint's EMA (the tensors go to ema.safetensors)."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.module.load_state_dict(tensors)
        self.updates = int(state["updates"])


def make_ema(cfg: Config, model: nn.Module) -> WeightEma | None:
    """The run's EMA of `model` (on its device), or None when train.ema_decay is 0."""
    t = cfg.train
    return WeightEma(model, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None


def check_resumable(saved: dict | None, decay: float) -> None:
    """Refuse a checkpoint whose EMA does not fit train.ema_decay: a run cannot continue an average
    it never kept, and dropping one it kept would change which file best.safetensors can be."""
    if saved and decay <= 0:
        raise UsageError(f"cannot resume: the checkpoint keeps EMA weights (train.ema_decay = {saved['decay']}) "
                         f"but train.ema_decay is 0; set train.ema_decay={saved['decay']} or start a new run.dir")
    if not saved and decay > 0:
        raise UsageError(f"cannot resume: the checkpoint was trained without EMA weights but train.ema_decay is "
                         f"{decay}; set train.ema_decay=0 to continue it, or start a new run.dir (e.g. with "
                         f"model.weights=RUN_DIR/last.safetensors)")


def prefixed(stats: dict) -> dict:
    """An evaluation's metrics as the EMA's: val_acc -> ema_val_acc (val_images is the same)."""
    return {PREFIX + k: v for k, v in stats.items() if k in _VAL_KEYS}


def better_weights(metrics: dict, best: BestMetric) -> str:
    """"ema" when the EMA weights score strictly better than the raw ones by `best`, else "raw"."""
    ema = metrics.get(PREFIX + best.key)
    if ema is None:
        return "raw"
    return "ema" if best.better(ema, metrics[best.key]) else "raw"


def score(metrics: dict, best: BestMetric) -> float:
    """The epoch's `best` metric, of its better weights."""
    return metrics[PREFIX + best.key if better_weights(metrics, best) == "ema" else best.key]


def file_metrics(metrics: dict, weights: str) -> dict:
    """The metrics a model file records: val_* are those of the weights it holds (what
    `evaluate.py --split val` gives back); with EMA weights, the raw ones move to raw_val_*."""
    if weights != "ema":
        return metrics
    swapped = {k: metrics[PREFIX + k] for k in _VAL_KEYS if PREFIX + k in metrics}
    return {**metrics, **{f"raw_{k}": metrics[k] for k in swapped}, **swapped}
