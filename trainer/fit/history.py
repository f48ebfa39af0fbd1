"""The run's history: one record per finished epoch (the lines of metrics.jsonl), the best of them
and how many epochs have passed without beating it (early stopping)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.fit.ema import PREFIX, better_weights, score
from trainer.task.best_metric import BestMetric


@dataclass
class RunHistory:
    best_metric: BestMetric  # train.best_metric and which way is better, as the run's task says
    epochs: list[dict] = field(default_factory=list)
    best: dict | None = None
    epochs_without_improvement: int = 0

    def record(self, metrics: dict) -> bool:
        """Add an epoch's metrics; True when it is the new best. With EMA weights evaluated too
        (ema_val_*), an epoch scores by the better of its raw and EMA weights, named in `best_weights`."""
        now = score(metrics, self.best_metric)
        improved = self.best is None or self.best_metric.better(now, score(self.best, self.best_metric))
        record = {**metrics, "is_best": improved}
        if PREFIX + self.best_metric.key in metrics:
            record["best_weights"] = better_weights(metrics, self.best_metric)
        self.epochs.append(record)
        if improved:
            self.best, self.epochs_without_improvement = record, 0
        else:
            self.epochs_without_improvement += 1
        return improved

    def patience_spent(self, patience: int) -> bool:
        return bool(patience) and self.epochs_without_improvement >= patience

    def to_state(self) -> dict:
        return {"best": self.best, "history": self.epochs, "epochs_without_improvement": self.epochs_without_improvement}

    @classmethod
    def from_state(cls, best_metric: BestMetric, state: dict) -> "RunHistory":
        return cls(best_metric, list(state["history"]), state["best"], state["epochs_without_improvement"])
