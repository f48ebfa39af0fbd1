"""What a run tells the user: the start summary, the epoch table and metrics.jsonl (W&B: tracking.py).

Every method is a no-op off the main process, so callers need no rank checks of their own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from data.files import append_line, is_write_fault, trim_jsonl, write_failed

# (metric key, column title, format) in the order the epoch table shows them.
_COLUMNS = [
    ("epoch", "epoch", "{:>5d}"),
    ("train_loss", "train_loss", "{:>10.4f}"),
    ("train_acc", "train_acc", "{:>9.4f}"),
    ("val_loss", "val_loss", "{:>8.4f}"),
    ("val_acc", "val_acc", "{:>7.4f}"),
    ("ema_val_acc", "ema_acc", "{:>7.4f}"),  # with train.ema_decay: the EMA weights' val_acc
    ("val_top5", "val_top5", "{:>8.4f}"),
    ("val_map", "val_mAP", "{:>7.4f}"),  # multi-label runs: these three instead of accuracy
    ("val_f1_micro", "val_F1_micro", "{:>12.4f}"),
    ("val_f1_macro", "val_F1_macro", "{:>12.4f}"),
    ("ema_val_map", "ema_mAP", "{:>7.4f}"),  # multi-label with train.ema_decay
    ("lr", "lr", "{:>9.2e}"),
    ("images_per_sec", "img/s", "{:>8.1f}"),
    ("epoch_time", "time", "{:>6.1f}s"),
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


def time_spent(epochs: list[dict]) -> str | None:
    """Where the training time went (this process): waiting for batches vs computing, with what to
    do when the input pipeline is the limit."""
    timed = [e for e in epochs if "data_wait_seconds" in e and e.get("train_seconds")]
    if not timed:
        return None
    total = sum(e["train_seconds"] for e in timed)
    waited = min(sum(e["data_wait_seconds"] for e in timed), total)
    line = (f"training time {total:.1f}s: {waited / total:.0%} waiting for data, "
            f"{1 - waited / total:.0%} computing")
    if waited / total > 0.2:
        line += ("; the input pipeline is the limit: more data.num_workers, photos stored nearer the "
                 "training size, or a smaller data.image_size")
    return line


class RunReport:
    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._header_printed = False
        self._started = time.time()

    @property
    def active(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *lines: str) -> None:
        if self.active:
            print(*lines, sep="\n", flush=True)

    def start(self, *, model_name: str, total_params: int, trainable_params: int, splits, runtime: dict,
              notes: list[str]) -> None:
        if not self.active:
            return
        lines = [
            f"model    {model_name}: {format_count(total_params)} parameters, "
            f"{format_count(trainable_params)} trainable",
            *[f"         {note}" for note in notes],
            f"data     {splits.root} ({splits.layout}): {len(splits.classes)} classes, "
            f"{len(splits.train)} train / {len(splits.val)} val images",
        ]
        train_counts, val_counts = splits.class_counts("train"), splits.class_counts("val")
        width = max(len(c) for c in splits.classes)
        shown = splits.classes if len(splits.classes) <= 20 else splits.classes[:10]
        for name in shown:
            lines.append(f"         {name:<{width}}  train {train_counts[name]:>6}  val {val_counts[name]:>6}")
        if len(shown) < len(splits.classes):
            counts = sorted(train_counts.values())
            lines.append(f"         ... {len(splits.classes) - len(shown)} more classes; "
                         f"train images per class: min {counts[0]}, max {counts[-1]}")
        lines.append(
            f"runtime  device {runtime['device']}, {runtime['num_processes']} process(es), "
            f"precision {runtime['precision']}, batch {runtime['batch_size']} per process x "
            f"{runtime['num_processes']} process(es) x {runtime.get('grad_accum_steps', 1)} accumulation "
            f"= {runtime['global_batch_size']} global")
        if "parallel" in runtime:
            lines.append(f"         machines {runtime.get('num_machines', 1)}, parallel {runtime['parallel']}, "
                         f"{runtime.get('cpu_threads', '?')} CPU thread(s) per process")
        lines.append(f"run dir  {self.run_dir}")
        self.print(*lines)

    def continue_after(self, epoch: int) -> None:
        """A resumed run: drop the metrics.jsonl lines of epochs after `epoch` (trained again now) and
        a line a kill or a full disk cut short. A fresh start (0) empties it: the run owns its log."""
        if self.active and trim_jsonl(self.metrics_path, "epoch", epoch) and epoch:
            self.print(f"note: dropped a damaged line from {self.metrics_path}")

    def epoch(self, metrics: dict) -> dict | None:
        """One row of the epoch table and one line of metrics.jsonl; returns that line's record.
        `metrics` is the history's record of the epoch (with `is_best`)."""
        if not self.active:
            return None
        is_best = metrics["is_best"]
        columns = [c for c in _COLUMNS if c[0] in metrics]
        if not self._header_printed:
            header = "  ".join(title.rjust(len(fmt.format(0 if "d" in fmt else 0.0))) for _, title, fmt in columns)
            self.print(header)
            self._header_printed = True
        row = "  ".join(fmt.format(metrics[key]) for key, _, fmt in columns)
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

    def finish(self, *, best: dict | None, stopped_early: bool, written: list[Path], epochs: list[dict] = (),
               headline: str = "val_acc") -> None:
        """The run's last lines; `headline`: the task's validation metric the best epoch is shown by."""
        if not self.active:
            return
        lines = [line for line in [time_spent(epochs)] if line]
        if stopped_early:
            lines.append("stopped early: no improvement for train.early_stopping_patience epochs")
        if best:
            ema = best.get("best_weights") == "ema"  # best.safetensors holds the EMA weights
            p, held = ("ema_", " (EMA weights)") if ema else ("", "")
            lines.append(f"best epoch {best['epoch']}{held}: {headline} {best[p + headline]:.4f}, "
                         f"val_loss {best[p + 'val_loss']:.4f}")
        lines.append(f"wall time {time.time() - self._started:.1f}s")
        lines += [f"wrote {path}" for path in written]
        self.print(*lines)
