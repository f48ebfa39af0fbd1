"""The training function: build -> accelerator.prepare -> for each epoch train, evaluate, checkpoint.

Read `train` top to bottom; the helpers below it take one context object or a few arguments and
return a dict.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from safetensors import SafetensorError
from tqdm.auto import tqdm

from configs.errors import TrainingFailed
from configs.schema import Config
from data.dataset import read_load_failures
from data.files import atomic_write_text
from data.sources import source_reads
from data.transforms import NormalizedBatches
from models import count_parameters, set_train_mode
from trainer.assemble.run_parts import RunParts, build_run, head_spec
from trainer.fit.ema import WeightEma, file_metrics, make_ema, prefixed
from trainer.files.faults import crash_point
from trainer.assemble.feature_cache import with_sample_images
from trainer.files.model_file import ClassifierFacts, save_classifier
from trainer.task.single import ValidationPredictions
from trainer.task.task import task_for
from trainer.fit.restore import Trainables
from trainer.fit.run_state import RunState
from trainer.reporting.console import ProgressLines, RunReport
from trainer.files.run_lock import RunLock, mark_run_folder
from trainer.assemble.accelerator import channels_last_on, describe, make_accelerator, prepare_model
from trainer.fit.step import StepCounters, StepOptions, StepParts, train_step
from trainer.reporting.tracking import wandb_trackers, RunTracking


@dataclass
class TrainResult:
    run_dir: Path
    best: dict | None
    history: list[dict]
    stopped_early: bool


@dataclass
class Training:
    """What the epoch functions share: the prepared step parts, the loaders and the run's state."""

    step: StepParts
    train_loader: object
    val_loader: object
    run_state: RunState
    tracking: RunTracking
    log_every: int
    global_batch_size: int
    progress_every_seconds: float  # progress lines when stdout is not a terminal
    ema_model: nn.Module | None = None  # the EMA weights as validation runs them (with cached features: the head)


def train(cfg: Config) -> TrainResult:
    accelerator = make_accelerator(cfg, trackers=wandb_trackers(cfg))
    set_seed(cfg.train.seed)
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    # One run per folder, checked (the run's own, writable, room for checkpoints) before anything else happens.
    with RunLock(run_dir, accelerator, reads=source_reads(cfg.data)):
        return _train(cfg, accelerator, run_dir)


def _train(cfg: Config, accelerator: Accelerator, run_dir: Path) -> TrainResult:
    # ---- build: everything that can fail on user input happens before a file is written ----
    run_state = RunState(accelerator, cfg, run_dir)  # finds run.resume's checkpoint: its class order is kept
    parts = build_run(cfg, accelerator, run_state.recorded_classes)
    model = prepare_model(parts.model, accelerator, cfg)
    # The training batches are sharded by their own resumable sampler, not by accelerator.prepare.
    model, optimizer, val_loader = accelerator.prepare(model, parts.optimizer, parts.val_loader)
    # The average of the whole classifier's weights, on the device (None: train.ema_decay = 0).
    ema = make_ema(cfg, parts.built.model)
    channels_last = channels_last_on(cfg, accelerator)
    if not cfg.train.cache_features:  # images arrive as uint8 and are normalized on the device
        val_loader = NormalizedBatches(val_loader, parts.data.preprocessing, channels_last)
    parts.enter_epoch(1)
    runtime = describe(accelerator, cfg.data.batch_size, cfg.train.grad_accum_steps, model)
    run_state.check_resume(parts.data.classes)  # refuses config changes the checkpoint cannot take, before any write
    report = RunReport(accelerator, run_dir)
    start_run_folder(accelerator, cfg, run_dir, parts.data.failure_log)
    tracking = RunTracking(accelerator, cfg, run_dir, parts.data.classes, parts.data.preprocessing)
    # Main process: the W&B run id (None without W&B), kept so a resumed run can continue it.
    wandb_run_id = tracking.start(config={**cfg.to_dict(), "runtime": runtime}, run_id=run_state.wandb_run_id or None)
    splits = parts.data.splits
    tracking.show_data(parts.data.train_images, {"train": splits.class_counts("train"),
                                                 "val": splits.class_counts("val")}, cfg.train.seed)
    # The module that trains, unwrapped: checkpoints hold its keys without a wrapper's prefix.
    # Loads the saved state when resuming (RNG last: nothing above may draw after it).
    run_state.attach(Trainables(parts.model, optimizer, parts.scheduler, parts.train_loader, accelerator.scaler, ema),
                     wandb_run_id)
    continue_logs(run_state, report, tracking)
    total, trainable = count_parameters(parts.built.model)
    report.start(cfg=cfg, total_params=total, trainable_params=trainable, splits=splits, runtime=runtime,
                 notes=parts.built.notes)
    facts = classifier_facts(cfg, parts, runtime)
    training = Training(StepParts(accelerator, model, optimizer, parts.scheduler, parts.criterion,
                                  StepOptions(cfg.train.grad_clip_norm, channels_last), ema),
                        parts.train_loader, val_loader, run_state, tracking, cfg.train.log_every_steps,
                        runtime["global_batch_size"], cfg.train.progress_every_seconds,
                        ema_model=ema_for_validation(ema, parts))
    model_weights = {"raw": parts.built.model, **({"ema": ema.module} if ema is not None else {})}

    # ---- epochs ----
    best_predictions = None  # the validation pass of the weights best.safetensors holds: what went wrong
    try:
        for epoch in run_state.epochs():
            metrics, predictions = run_epoch(training, parts, epoch)
            improved = run_state.record_epoch(metrics)
            weights = run_state.history.epochs[-1].get("best_weights", "raw")  # the better of raw and EMA
            record = report.epoch(run_state.history.epochs[-1])
            tracking.epoch(record, run_state.history.epochs, predictions[weights])
            best_predictions = predictions[weights] if improved else best_predictions
            if accelerator.is_main_process:
                save_model_files(run_dir, model_weights, facts, metrics, weights if improved else None)
            run_state.end_epoch(epoch, improved)  # the resumable checkpoint, rotated
            if run_state.stopped_early:
                break
    finally:
        run_state.close()  # the SIGTERM/SIGINT handlers go, also when training failed

    # ---- finish ----
    accelerator.wait_for_everyone()
    warn_about_load_failures(report, parts.data.failure_log)
    mistake_files, lines = tracking.mistakes(best_predictions, parts.data.val_images, run_state.history.best)
    report.print(*lines)
    written = [run_dir / "best.safetensors", run_dir / "last.safetensors",
               *([run_dir / "ema.safetensors"] if ema is not None else []), run_state.root, run_dir / "config.toml",
               run_dir / "metrics.jsonl", *tracking.finish(run_dir / "best.safetensors"), *mistake_files]
    history = run_state.history
    report.finish(best=history.best, stopped_early=run_state.stopped_early, written=written,
                  chosen_by=history.best_metric, epochs=history.epochs, headline=task_for(cfg).headline)
    accelerator.end_training()
    return TrainResult(run_dir, history.best, history.epochs, run_state.stopped_early)


def continue_logs(run_state: RunState, report: RunReport, tracking: RunTracking) -> None:
    """Each log's writer drops what a killed run wrote after its checkpoint; a fresh start keeps
    nothing (a run killed before its first checkpoint restarts fresh, and must not append to its logs)."""
    if run_state.resumed_from is not None:
        report.continue_after(run_state.epoch - 1)
        tracking.continue_after(run_state.batches_done)
    else:
        report.start_fresh()
        tracking.start_fresh()


def warn_about_load_failures(report: RunReport, failure_log: Path) -> None:
    failures = read_load_failures(failure_log)
    if failures:
        report.print(f"warning: {len(failures)} files failed to load during training and were skipped; "
                     f"listed in {failure_log}")


def save_model_files(run_dir: Path, models: dict[str, nn.Module], facts: ClassifierFacts, metrics: dict,
                     best: str | None) -> None:
    """last.safetensors (the raw weights), ema.safetensors (the EMA's, when `models` has "ema"), and
    best.safetensors when the epoch improved (`best`: which of the two, else None); each replaced
    atomically, so a failed write (disk full) leaves the previous file whole and ends training in one line."""
    files = {"last.safetensors": "raw", **({"ema.safetensors": "ema"} if "ema" in models else {})}
    if best is not None:
        files["best.safetensors"] = best
    for name, weights in files.items():
        state = models[weights].state_dict()  # the whole classifier, also when only the head trained
        try:
            crash_point("model_file", metrics["epoch"])
            save_classifier(run_dir / name, state, facts, metrics=file_metrics(metrics, weights),
                            epoch=metrics["epoch"], weights=weights)
        except (OSError, SafetensorError) as e:
            raise TrainingFailed(f"could not write {run_dir / name} ({type(e).__name__}: {e}); the previous one "
                                 "is intact. Free space in run.dir and continue with run.resume=auto") from None


def start_run_folder(accelerator: Accelerator, cfg: Config, run_dir: Path, failure_log: Path) -> None:
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark_run_folder(run_dir)  # before any output: a folder holding outputs is always recognised as a run's
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        failure_log.unlink(missing_ok=True)  # a previous run's list would be misleading
    accelerator.wait_for_everyone()


def classifier_facts(cfg: Config, parts: RunParts, runtime: dict) -> ClassifierFacts:
    """What every model file of this run records besides its weights and metrics."""
    kept = ("num_processes", "device", "precision", "global_batch_size")
    return ClassifierFacts(model_name=cfg.model.name, head=head_spec(cfg).to_dict(), class_names=parts.data.classes,
                           preprocessing=parts.data.preprocessing, config=cfg.to_dict(),
                           runtime={k: runtime[k] for k in kept})


def ema_for_validation(ema: WeightEma | None, parts: RunParts) -> nn.Module | None:
    """The EMA module validation runs: the whole classifier, or its head when batches are cached features."""
    if ema is None:
        return None
    return ema.module.get_submodule(parts.built.head_name) if parts.cfg.train.cache_features else ema.module


def run_epoch(training: Training, parts: RunParts, epoch: int) -> tuple[dict, dict[str, ValidationPredictions]]:
    """Train one epoch, then evaluate the raw weights (and the EMA's, metrics prefixed ema_); the
    epoch's metrics and each one's validation predictions, keyed "raw" / "ema"."""
    started = time.perf_counter()
    parts.enter_epoch(epoch)  # a pure function of the epoch, so a resume recomputes it
    run_state = training.run_state
    run_state.begin_epoch(epoch)  # this epoch's sample order, after the batches a checkpoint already did
    group_lrs = run_state.epoch_start_lrs  # the rates this epoch started with (also after a mid-epoch resume)
    task = task_for(parts.cfg)  # its metrics: accuracy, or (multi-label) mAP and F1
    train_stats = task.train_metrics(train_one_epoch(training, epoch))
    step = training.step
    val_stats, predictions = {}, {}
    evaluated = {"raw": step.model, **({"ema": training.ema_model} if training.ema_model is not None else {})}
    for weights, model in evaluated.items():  # every process evaluates both: the same collectives
        stats, predictions[weights] = task.validate(step.accelerator, model, training.val_loader, step.criterion,
                                                    parts.data.classes)
        val_stats |= stats if weights == "raw" else prefixed(stats)
        if parts.cfg.train.cache_features:  # the grid needs images, not the features the head saw
            predictions[weights] = with_sample_images(predictions[weights], parts.data.val_images,
                                                      step.accelerator.num_processes, parts.cfg.data.batch_size,
                                                      parts.data.preprocessing)
    metrics = {"epoch": epoch, **train_stats, "lr": group_lrs[0], **val_stats,
               "epoch_time": time.perf_counter() - started,
               "images_per_sec": train_stats["train_images"] / max(train_stats["train_seconds"], 1e-9)}
    if len(group_lrs) > 1:
        metrics["lr_backbone"] = group_lrs[1]
    metrics["trainable_params"] = count_parameters(parts.built.model)[1]
    return metrics, predictions


def train_one_epoch(training: Training, epoch: int) -> dict:
    step, run_state = training.step, training.run_state
    accelerator = step.accelerator
    set_train_mode(accelerator.unwrap_model(step.model))
    counters = StepCounters()
    # Zeros, or the totals and counters where a mid-epoch checkpoint was.
    loss_sum, correct, seen = run_state.epoch_totals(accelerator.device, counters)
    loader = training.train_loader
    steps_per_epoch = loader.sampler.steps_per_epoch
    clock = WaitClock()
    lines = ProgressLines(accelerator, training.progress_every_seconds, loader.sampler.samples_per_step)
    first_position = run_state.batch_in_epoch
    # A bar redrawn into a log file is noise: only draw it on a terminal.
    bar = tqdm(clock.timed(loader), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               initial=run_state.batch_in_epoch, total=steps_per_epoch,
               disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    lr = step.scheduler.get_last_lr()[0]  # (an epoch resumed after its last batch trains none)
    for images, labels in bar:
        position = run_state.batch_in_epoch  # the batch's index in the epoch, the same after a resume
        lr = step.scheduler.get_last_lr()[0]  # the rate this batch trains with (the step may advance it)
        logits, loss = train_step(step, images, labels, counters, position)
        # Totals stay on the device: reading them every step would make the host wait for the GPU.
        # MixUp/CutMix make labels soft (batch, classes); accuracy counts the dominant class.
        hard = labels.argmax(1) if labels.ndim == 2 else labels
        loss_sum += loss.double() * hard.numel()
        correct += (logits.argmax(1) == hard).sum()
        seen += hard.numel()
        last = position + 1 == steps_per_epoch
        if position % training.log_every == 0 or last:  # the one host read of device values, at log intervals
            counters.raise_if_nonfinite(accelerator, f"epoch {epoch}")
            log_step(training, bar, epoch, position, loss, lr)
        if lines.due():  # the main process only: no collective here
            lines.show(epoch, position, steps_per_epoch, loss.item(), position + 1 - first_position)
        run_state.step_done(loss_sum, correct, seen, counters)  # checkpoints every N steps; on SIGTERM: checkpoint, exit 75
    bar.close()  # (the epoch's last batch ran the non-finite check)
    # Sum over processes: every process reaches this collective once per epoch.
    loss_sum, correct, seen = accelerator.reduce(torch.stack([loss_sum, correct.double(), seen.double()]),
                                                 reduction="sum").tolist()
    seconds = clock.elapsed()  # after the reduce: the GPU has finished the epoch's work
    if counters.skipped_steps:
        accelerator.print(f"note: epoch {epoch}: {counters.skipped_steps} of "
                          f"{counters.optimizer_steps + counters.skipped_steps} fp16 steps skipped because "
                          "gradients overflowed (the scaler lowered its scale)")
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "lr_end": lr, "train_images": int(seen), "train_seconds": seconds,
            "data_wait_seconds": clock.waited, "optimizer_steps": counters.optimizer_steps,
            "skipped_steps": counters.skipped_steps}


def log_step(training: Training, bar, epoch: int, position: int, loss: torch.Tensor, lr: float) -> None:
    """The progress bar's numbers, and a train_steps.jsonl / W&B point (loss, the rate the step
    trained with, and images/s since the previous point of the epoch; each epoch's last batch is
    logged too, so every epoch has a rate)."""
    run_state = training.run_state
    loss_value = loss.item()
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    steps = training.train_loader.sampler.steps_per_epoch
    training.tracking.train_step(epoch, run_state.batches_done + 1, epoch - 1 + (position + 1) / steps, loss_value, lr,
                                 training.global_batch_size)


class WaitClock:
    """How long the training loop waited for its next batch, and how long it ran in all.

    The host queues GPU work without waiting for it, so time blocked in the loader is time the
    input pipeline could not keep up; the rest is compute (and the host waiting for the GPU)."""

    def __init__(self):
        self.started, self.waited = time.perf_counter(), 0.0

    def timed(self, batches):
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - asked
            yield batch

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
