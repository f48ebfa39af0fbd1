"""The best-epoch rule (`train.best_metric`): which metric keys each task allows and which way each
is better. It picks best.safetensors, early stopping's patience and the EMA-or-raw choice.

Kept free of torch so that reading a config (`load_config`, also for `--print-config`) can refuse
a metric of the other task; `trainer.task.task`'s Task objects hand the same rule out.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.errors import ConfigError
from configs.schema import Config

# data.task -> the train.best_metric values it allows -> whether higher is better.
ALLOWED = {"single": {"val_loss": False, "val_acc": True},
           "multilabel": {"val_loss": False, "val_map": True}}


@dataclass(frozen=True)
class BestMetric:
    """`train.best_metric` as a rule: the metric key (as metrics.jsonl spells it) and which way is better."""

    key: str
    higher_is_better: bool

    def better(self, new: float, old: float) -> bool:
        """Strictly better: a tie keeps the earlier epoch, and the raw weights over the EMA's."""
        return new > old if self.higher_is_better else new < old


def best_metric(task: str, metric: str) -> BestMetric:
    """`metric` as train.best_metric of `task`; one ConfigError line naming the allowed values."""
    allowed = ALLOWED[task]
    if metric not in allowed:
        raise ConfigError(f"train.best_metric = {metric!r} is not a metric of data.task = {task}; use one of: "
                          f"{', '.join(repr(m) for m in allowed)}")
    return BestMetric(metric, allowed[metric])


def best_metric_of(cfg: Config) -> BestMetric:
    """The run's rule: train.best_metric, refused when the run's task has no such metric."""
    return best_metric(cfg.data.task, cfg.train.best_metric)
