"""What a run tells the user: the start summary, the epoch table and metrics.jsonl (W&B: tracking.py).

Every method is a no-op off the main process, so callers need no rank checks of their own.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from accelerate import Accelerator

from data.files import append_line, is_write_fault, trim_jsonl, write_failed

# (metric key, format) in the order the epoch table shows them. A column's title is its key: the
# same name as in metrics.jsonl, W&B (epoch/<key>), train.best_metric and the docs.
_COLUMNS = [
    ("epoch", "{:>5d}"),
    ("train_loss", "{:>10.4f}"),
    ("train_acc", "{:>9.4f}"),
    ("val_loss", "{:>8.4f}"),
    ("val_acc", "{:>7.4f}"),
    ("ema_val_acc", "{:>11.4f}"),  # with train.ema_decay: the EMA weights' val_acc
    ("val_top5", "{:>8.4f}"),
    ("val_map", "{:>7.4f}"),  # multi-label runs: these three instead of accuracy
    ("val_f1_micro", "{:>12.4f}"),
    ("val_f1_macro", "{:>12.4f}"),
    ("ema_val_map", "{:>11.4f}"),  # multi-label with train.ema_decay
    ("lr", "{:>9.2e}"),  # the rate of the epoch's first step
    ("lr_end", "{:>9.2e}"),  # the rate of its last step (with a schedule the two differ)
    ("images_per_sec", "{:>14.1f}"),
    ("epoch_time", "{:>9.1f}s"),
]


def format_count(n: int) -> str:
    return f"{n:,}"


class ProgressLines:
    """Progress between epoch rows for logs that are not a terminal (SLURM, nohup, a pipe), where
    no bar is drawn: one line every `every_seconds`, from the main process."""

    def __init__(self, accelerator: Accelerator, every_seconds: float, batch_size: int):
        self.on = accelerator.is_main_process and every_seconds > 0 and not sys.stdout.isatty()
        self.every, self.batch_size = every_seconds, batch_size
        self.started = self.last = time.perf_counter()

    def due(self) -> bool:
        return self.on and time.perf_counter() - self.last >= self.every

    def show(self, epoch: int, position: int, total: int, loss: float, batches_since_start: int) -> None:
        now = time.perf_counter()
        rate = batches_since_start * self.batch_size / max(now - self.started, 1e-9)
        left = (total - position - 1) * self.batch_size / max(rate, 1e-9)
        print(f"epoch {epoch} step {position + 1}/{total} ({(position + 1) / total:.0%}): loss {loss:.4f}, "
              f"{rate:.1f} img/s, epoch ends in {left:.0f}s", flush=True)
        self.last = now


# The input-pipeline advice fires when waiting for batches is both a large share of training time and
# long in absolute terms: a share alone fires on toy runs, where the loader workers' start-up at each
# epoch's first batch (about a second, which no pipeline setting removes) is a large share of a
# 1-second epoch. Under 10 s of waiting in a whole run, no change to the pipeline wins back time
# worth a config edit.
ADVICE_WAIT_SHARE = 0.2
ADVICE_WAIT_SECONDS = 10.0


def time_spent(epochs: list[dict], resumed: bool = False) -> str | None:
    """Where the training time went, over every epoch of the run (on a `resumed` run those trained
    before the resume too, as their records carry their times): waiting for batches vs computing,
    with what to do when the input pipeline is the limit. Measured on the main process, training
    steps only."""
    timed = [e for e in epochs if "data_wait_seconds" in e and e.get("train_seconds")]
    if not timed:
        return None
    total = sum(e["train_seconds"] for e in timed)
    waited = min(sum(e["data_wait_seconds"] for e in timed), total)
    which = "the whole run's, before the resume too" if resumed else "this run's"
    line = (f"training time {total:.1f}s ({which}: the training steps of {len(timed)} epoch(s), without setup and "
            f"validation): {waited / total:.0%} waiting for data, {1 - waited / total:.0%} computing")
    if waited / total > ADVICE_WAIT_SHARE and waited >= ADVICE_WAIT_SECONDS:
        line += ("; the input pipeline is the limit: more data.num_workers, photos stored nearer the "
                 "training size, or a smaller data.image_size")
    return line


# The settings that change what training computes, one line per section, as `key=value` the user can
# paste as an override. Keys that only apply with another value are left out where they do not.
_SETTINGS = {
    "data": ("task", "image_size", "augment", "augment_ops", "mixup_alpha", "cutmix_alpha", "sampler", "normalize"),
    "model": ("pretrained", "weights", "head", "freeze", "bn", "drop_path_rate"),
    "optim": ("name", "lr", "weight_decay", "no_decay_norm_bias", "momentum", "nesterov", "scheduler", "step_size",
              "gamma", "warmup_epochs", "min_lr", "backbone_lr_mult", "layer_decay"),
    "train": ("epochs", "seed", "best_metric", "label_smoothing", "class_weights", "grad_clip_norm",
              "unfreeze_at_epoch", "cache_features", "ema_decay", "ema_warmup"),
    "runtime": ("grad_checkpointing", "sync_bn", "compile"),
}
# Keys that matter only with another key's value, and that rule (`v`: a dotted key's value).
_ONLY_WITH = {
    "optim.momentum": lambda v: v("optim.name") == "sgd",
    "optim.nesterov": lambda v: v("optim.name") == "sgd",
    "optim.step_size": lambda v: v("optim.scheduler") == "step",
    "optim.gamma": lambda v: v("optim.scheduler") == "step",
    "optim.min_lr": lambda v: v("optim.scheduler") == "cosine",
    "optim.no_decay_norm_bias": lambda v: v("optim.weight_decay") > 0,
    "train.ema_warmup": lambda v: v("train.ema_decay") > 0,
    "model.weights": lambda v: bool(v("model.weights")),
}


def settings_lines(config: dict, precision: str) -> list[str]:
    """The start summary's settings: every key that changes training (`config`: Config.to_dict()),
    and the precision that runs (train.precision auto resolved by the launcher)."""
    def value(dotted: str):
        section, key = dotted.split(".")
        return config[section][key]

    def shown(dotted: str) -> bool:
        return dotted not in _ONLY_WITH or _ONLY_WITH[dotted](value)

    lines = []
    for section, keys in _SETTINGS.items():
        pairs = [f"{section}.{k}={_plain(value(f'{section}.{k}'))}" for k in keys if shown(f"{section}.{k}")]
        if section == "train":
            pairs.insert(0, f"train.precision={precision}")
        lines += textwrap.wrap(" ".join(pairs), width=100, break_long_words=False, break_on_hyphens=False)
    return lines


def _plain(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def unvalidated_classes(train_counts: dict[str, int], val_counts: dict[str, int]) -> list[str]:
    """A warning naming the classes with no validation image: their per-class accuracy is undefined
    (nan), and no epoch can show whether the model learned them. (One image is enough to be
    counted; how reliable a handful is, the per-class table shows.)"""
    empty = [name for name, n in val_counts.items() if n == 0]
    if not empty:
        return []
    shown = ", ".join(f"{name!r} ({train_counts[name]} training)" for name in empty[:5])
    more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
    return [f"{len(empty)} class(es) have no validation image: {shown}{more}; their per-class accuracy will be "
            f"nan. Add images (a split by data.val_fraction needs at least 2 per class to put one in each "
            f"split; a val/ folder needs at least one in val/CLASS)"]


def best_file_line(best: dict, chosen_by, headline: str) -> str:
    """Which weights best.safetensors holds: raw or EMA, of which epoch, picked by which metric
    (`chosen_by`: the run's BestMetric)."""
    ema = best.get("best_weights") == "ema"
    p = "ema_" if ema else ""
    weights = ("the EMA weights" if ema else
               "the raw weights (the EMA's scored no better)" if "best_weights" in best else "the raw weights")
    way = "higher" if chosen_by.higher_is_better else "lower"
    shown = [f"{p}{chosen_by.key} {best[p + chosen_by.key]:.4f} ({way} is better)"]
    shown += [f"{p}{k} {best[p + k]:.4f}" for k in (headline, "val_loss") if k != chosen_by.key and p + k in best]
    return f"best.safetensors holds {weights} of epoch {best['epoch']}, chosen by train.best_metric: {', '.join(shown)}"


class RunReport:
    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._header_printed = False
        self._started = time.time()
        self._resumed = False

    @property
    def active(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *lines: str) -> None:
        if self.active:
            print(*lines, sep="\n", flush=True)

    def start(self, *, cfg, total_params: int, trainable_params: int, splits, runtime: dict,
              notes: list[str]) -> None:
        """The start summary; `cfg`: the run's Config (its settings, the data root as the user named it)."""
        if not self.active:
            return
        root = Path(cfg.data.root).expanduser().resolve()
        lines = [
            *[f"note: {note}" for note in cfg.read_notes],
            f"model    {cfg.model.name}: {format_count(total_params)} parameters, "
            f"{format_count(trainable_params)} trainable",
            *[f"         {note}" for note in notes],
            f"data     {root} ({splits.layout}): {len(splits.classes)} classes, "
            f"{len(splits.train)} train / {len(splits.val)} val images",
        ]
        if Path(splits.root) != root:  # a dataset whose images are cached as files elsewhere (hf)
            lines.append(f"         image files in {splits.root}")
        train_counts, val_counts = splits.class_counts("train"), splits.class_counts("val")
        width = max(len(c) for c in splits.classes)
        shown = splits.classes if len(splits.classes) <= 20 else splits.classes[:10]
        for name in shown:
            lines.append(f"         {name:<{width}}  train {train_counts[name]:>6}  val {val_counts[name]:>6}")
        if len(shown) < len(splits.classes):
            counts = sorted(train_counts.values())
            lines.append(f"         ... {len(splits.classes) - len(shown)} more classes; "
                         f"train images per class: min {counts[0]}, max {counts[-1]}")
        lines += [f"warning: {w}" for w in [*splits.warnings, *unvalidated_classes(train_counts, val_counts)]]
        lines.append(
            f"runtime  device {runtime['device']}, {runtime['num_processes']} process(es), "
            f"precision {runtime['precision']}, batch {runtime['batch_size']} per process x "
            f"{runtime['num_processes']} process(es) x {runtime.get('grad_accum_steps', 1)} accumulation "
            f"= {runtime['global_batch_size']} global")
        if "parallel" in runtime:
            lines.append(f"         machines {runtime.get('num_machines', 1)}, parallel {runtime['parallel']}, "
                         f"{runtime.get('cpu_threads', '?')} CPU thread(s) per process")
        first, *more = settings_lines(cfg.to_dict(), runtime["precision"])
        lines += [f"settings {first}", *[f"         {line}" for line in more]]
        lines.append(f"run dir  {self.run_dir}")
        self.print(*lines)

    def continue_after(self, epoch: int) -> None:
        """A resumed run: drop the metrics.jsonl lines of epochs after `epoch` (trained again now) and
        a line a kill or a full disk cut short."""
        self._resumed = True
        if self.active and trim_jsonl(self.metrics_path, "epoch", epoch):
            self.print(f"note: dropped a damaged line from {self.metrics_path}")

    def start_fresh(self) -> None:
        """A fresh start: metrics.jsonl begins empty. The run owns it, and a run killed before its
        first checkpoint (which restarts fresh) left lines of its own."""
        if self.active:
            trim_jsonl(self.metrics_path, "epoch", 0)

    def epoch(self, metrics: dict) -> dict | None:
        """One row of the epoch table and one line of metrics.jsonl; returns that line's record.
        `metrics` is the history's record of the epoch (with `is_best`)."""
        if not self.active:
            return None
        is_best = metrics["is_best"]
        columns = [c for c in _COLUMNS if c[0] in metrics]
        if not self._header_printed:
            header = "  ".join(key.rjust(len(fmt.format(0 if "d" in fmt else 0.0))) for key, fmt in columns)
            self.print(header)
            self._header_printed = True
        row = "  ".join(fmt.format(metrics[key]) for key, fmt in columns)
        self.print(row + ("  *" if is_best else ""))
        record = {**metrics, "wall_time": time.time() - self._started}
        try:
            append_line(self.metrics_path, json.dumps(record), durable=True)
        except OSError as e:
            if not is_write_fault(e):
                raise
            raise write_failed(self.metrics_path, e, "the log and the checkpoints written so far are intact; "
                                                     "{remedy} and continue with run.resume=auto") from None
        return record

    def finish(self, *, best: dict | None, stopped_early: bool, written: list[Path], chosen_by,
               epochs: list[dict] = (), headline: str = "val_acc") -> None:
        """The run's last lines; `headline`: the task's validation metric; `chosen_by`: the run's
        BestMetric (train.best_metric), which picked best.safetensors."""
        if not self.active:
            return
        lines = [line for line in [time_spent(epochs, self._resumed)] if line]
        if stopped_early:
            lines.append("stopped early: no improvement for train.early_stopping_patience epochs")
        if best:
            lines.append(best_file_line(best, chosen_by, headline))
        lines.append(f"wall time {time.time() - self._started:.1f}s (this process, start to end: setup, "
                     f"training and validation)")
        lines += [f"wrote {path}" for path in written]
        self.print(*lines)
