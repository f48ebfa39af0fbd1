"""The training function: build -> accelerator.prepare -> for each epoch train, evaluate, checkpoint.

Read it top to bottom; the helpers below it each take a few arguments and return a dict.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from data import ImageListDataset, discover, eval_transform, make_loader, resolve_normalization, train_transform
from data.audit_training import prepare_training_data
from data.balance import BalancedSampler, balanced_class_weights
from data.dataset import read_load_failures
from data.sampling import TrainBatches
from data.transforms import MixingCollate, batch_mixer
from models import HeadSpec, build_classifier, count_parameters, set_train_mode
from models.finetune import apply_epoch, make_plan, param_groups, prepare_for_wrapping
from trainer.model_file import save_classifier
from configs.schema import Config
from trainer.features import cached_head_datasets, with_sample_images
from trainer.optim import build_optimizer, build_scheduler
from trainer.report import RunReport
from trainer.progress import Progress
from trainer.runtime import describe, make_accelerator, prepare_model
from trainer.step import StepCounters, StepOptions, train_step
from trainer.tracking import SAMPLE_IMAGES, Predictions, RunTracking


@dataclass
class TrainResult:
    run_dir: Path
    best: dict | None
    history: list[dict]
    stopped_early: bool


def train(cfg: Config) -> TrainResult:
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)

    # ---- build: everything that can fail on user input happens before a file is written ----
    splits = discover(cfg.data.root, cfg.data.val_fraction, cfg.data.seed)
    head = HeadSpec(cfg.model.head, cfg.model.head_hidden, cfg.model.head_dropout)
    built = build_classifier(cfg.model.name, len(splits.classes), head, cfg.model.pretrained, cfg.model.weights)
    model = built.model
    # What trains when (model.freeze, train.unfreeze_at_epoch): see models/finetune.py.
    plan = make_plan(model, built.head_name, cfg.model.freeze, cfg.train.unfreeze_at_epoch)
    prepare_for_wrapping(model, plan)
    # The main process audits (all cores, writes the cache); the others then read the cached answer.
    with accelerator.main_process_first():
        prepared = prepare_training_data(splits, cfg.data, accelerator.is_main_process, accelerator.print)
    splits = prepared.splits
    mean, std = resolve_normalization(cfg.data.normalize, built.mean, built.std, prepared.mean or cfg.data.mean,
                                      prepared.std or cfg.data.std)
    d = cfg.data
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    failure_log = run_dir / "load_failures.jsonl"  # files that fail to decode mid-epoch are skipped and listed here
    train_ds = ImageListDataset(splits.train, train_transform(d.augment, d.image_size, mean, std, d.crop_pct,
                                                              d.augment_ops), failure_log, d.max_image_pixels)
    val_ds = ImageListDataset(splits.val, eval_transform(d.image_size, mean, std, d.crop_pct, d.augment),
                              failure_log, d.max_image_pixels)
    train_data, val_data, workers = train_ds, val_ds, d.num_workers
    if cfg.train.cache_features:  # fixed backbone: train only the head, on features computed once
        train_data, val_data, model = cached_head_datasets(accelerator, built, train_ds, val_ds, cfg)
        workers = 0  # the features are already in memory
    pin = accelerator.device.type == "cuda"
    labels = [label for _, label in splits.train]
    # The epoch's whole draw; TrainBatches shards it across processes and can start it mid-way.
    draw = BalancedSampler(labels, seed=cfg.train.seed).indices if d.sampler == "balanced" else None
    mixer = batch_mixer(len(splits.classes), d.mixup_alpha, d.cutmix_alpha)
    train_loader = TrainBatches(train_data, d.batch_size, workers, pin, cfg.train.seed, accelerator,
                                draw, MixingCollate(mixer) if mixer else None)
    val_loader = make_loader(val_data, d.batch_size, False, workers, pin, cfg.train.seed)
    optimizer = build_optimizer(param_groups(built.model, plan, cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim)
    class_weights = (balanced_class_weights(labels, len(splits.classes)).to(accelerator.device)
                     if cfg.train.class_weights == "balanced" else None)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.train.label_smoothing)

    model = prepare_model(model, accelerator, cfg.runtime)
    # The training batches are sharded by their own resumable sampler, not by accelerator.prepare.
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    # After prepare, len(train_loader) is this process's share of batches; with accumulation the
    # optimizer steps once per grad_accum_steps of them (and once more for a partial tail).
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, plan, steps_per_epoch, cfg.train.epochs)
    apply_epoch(built.model, plan, 1)
    step_options = StepOptions(cfg.train.grad_clip_norm, cfg.runtime.channels_last)

    runtime = describe(accelerator, d.batch_size, cfg.train.grad_accum_steps, model)
    # Finds the checkpoint run.resume names and refuses config changes it cannot take, before any write.
    progress = Progress(accelerator, cfg, run_dir, splits.classes)
    report = RunReport(accelerator, run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        failure_log.unlink(missing_ok=True)  # a previous run's list would be misleading
    accelerator.wait_for_everyone()
    tracking = RunTracking(accelerator, cfg, run_dir, splits.classes, mean, std)
    # Main process: the W&B run id (None without W&B), kept so a resumed run can continue it.
    wandb_run_id = tracking.start(config={**cfg.to_dict(), "runtime": runtime}, run_id=progress.wandb_run_id or None)
    tracking.show_data(train_ds, {"train": splits.class_counts("train"), "val": splits.class_counts("val")},
                       cfg.train.seed)
    # Loads the saved state when resuming (RNG last: nothing above may draw after it).
    progress.attach(model, optimizer, scheduler, train_loader, accelerator.scaler, wandb_run_id)
    total, trainable = count_parameters(built.model)
    report.start(model_name=cfg.model.name, total_params=total, trainable_params=trainable, splits=splits,
                 runtime=runtime, notes=built.notes)

    checkpoint_facts = dict(model_name=cfg.model.name, head=head.to_dict(), class_names=splits.classes, mean=mean,
                            std=std, image_size=d.image_size, crop_pct=d.crop_pct, config=cfg.to_dict(),
                            runtime={k: runtime[k] for k in ("num_processes", "device", "precision",
                                                             "global_batch_size")})
    higher_is_better = cfg.train.best_metric == "val_acc"
    best, history, epochs_without_improvement = progress.best, progress.history, progress.epochs_without_improvement
    stopped_early = progress.stopped_early

    # ---- epochs ----
    for epoch in range(progress.first_epoch, cfg.train.epochs + 1):
        started = time.perf_counter()
        apply_epoch(built.model, plan, epoch)  # a pure function of the epoch, so a resume recomputes it
        progress.begin_epoch(epoch)  # this epoch's sample order, after the batches a checkpoint already did
        group_lrs = progress.epoch_start_lrs  # the rates this epoch started with (also after a mid-epoch resume)
        train_stats = train_one_epoch(accelerator, model, train_loader, optimizer, scheduler, criterion,
                                      epoch, cfg.train.log_every_steps, tracking, runtime["global_batch_size"],
                                      step_options, progress)
        val_stats, predictions = evaluate(accelerator, model, val_loader, criterion, len(splits.classes),
                                          return_predictions=True)
        if cfg.train.cache_features:  # the grid needs images, not the features the head saw
            predictions = with_sample_images(predictions, val_ds, accelerator.num_processes, d.batch_size)
        elapsed = time.perf_counter() - started
        metrics = {"epoch": epoch, **train_stats, **val_stats, "epoch_time": elapsed,
                   "images_per_sec": train_stats["train_images"] / max(train_stats["train_seconds"], 1e-9)}
        if len(group_lrs) > 1:
            metrics["lr_backbone"] = group_lrs[1]
        metrics["trainable_params"] = count_parameters(built.model)[1]
        history.append(metrics)

        score = metrics[cfg.train.best_metric]
        improved = best is None or (score > best[cfg.train.best_metric] if higher_is_better
                                    else score < best[cfg.train.best_metric])
        if improved:
            best, epochs_without_improvement = metrics, 0
        else:
            epochs_without_improvement += 1
        record = report.epoch(metrics, improved)
        tracking.epoch(record, predictions)

        if accelerator.is_main_process:
            # With cached features `model` is the head alone; the checkpoint holds the whole classifier.
            state = built.model.state_dict() if cfg.train.cache_features else accelerator.get_state_dict(model)
            for name, keep in (("last", True), ("best", improved)):
                if keep:
                    save_classifier(run_dir / f"{name}.safetensors", state, metrics=metrics, epoch=epoch,
                                    **checkpoint_facts)
        progress.end_epoch(epoch, best=best, history=history, epochs_without_improvement=epochs_without_improvement,
                           improved=improved)  # the resumable checkpoint, rotated
        patience = cfg.train.early_stopping_patience
        if patience and epochs_without_improvement >= patience:
            stopped_early = True
            break

    progress.close()
    accelerator.wait_for_everyone()
    failures = read_load_failures(failure_log)
    if failures:
        report.print(f"warning: {len(failures)} files failed to load during training and were skipped; "
                     f"listed in {failure_log}")
    written = [run_dir / "best.safetensors", run_dir / "last.safetensors", progress.root, run_dir / "config.toml",
               run_dir / "metrics.jsonl", *tracking.finish(run_dir / "best.safetensors")]
    report.finish(best=best, stopped_early=stopped_early, written=written)
    accelerator.end_training()
    return TrainResult(run_dir, best, history, stopped_early)


def train_one_epoch(accelerator: Accelerator, model: nn.Module, loader, optimizer, scheduler, criterion,
                    epoch: int, log_every: int, tracking: RunTracking, global_batch_size: int,
                    options: StepOptions = StepOptions(), progress: Progress | None = None) -> dict:
    set_train_mode(accelerator.unwrap_model(model))
    device = accelerator.device
    counters = StepCounters()
    # Zeros, or the totals and counters where a mid-epoch checkpoint was.
    loss_sum, correct, seen = progress.epoch_totals(device, counters)
    started = time.perf_counter()
    # A bar redrawn into a log file is noise: only draw it on a terminal.
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not (accelerator.is_main_process and sys.stderr.isatty()))
    for step, (images, labels) in enumerate(bar):
        logits, loss = train_step(accelerator, model, images, labels, optimizer, scheduler, criterion, options,
                                  counters, epoch, step + 1)
        # MixUp/CutMix make labels soft (batch, classes); accuracy counts the dominant class.
        hard = labels.argmax(1) if labels.ndim == 2 else labels
        loss_sum += loss.double() * hard.numel()
        correct += (logits.argmax(1) == hard).sum()
        seen += hard.numel()
        if step % log_every == 0:
            loss_value, lr = loss.item(), scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            tracking.train_step(epoch, step, len(loader), loss_value, lr, global_batch_size)
        progress.step_done(loss_sum, correct, seen, counters)  # checkpoints every N steps; on SIGTERM: checkpoint, exit 75
    bar.close()
    seconds = time.perf_counter() - started
    # Sum over processes: every process reaches this collective once per epoch.
    loss_sum, correct, seen = accelerator.reduce(torch.stack([loss_sum, correct.double(), seen.double()]),
                                                 reduction="sum").tolist()
    if counters.skipped_steps:
        accelerator.print(f"note: epoch {epoch}: {counters.skipped_steps} of "
                          f"{counters.optimizer_steps + counters.skipped_steps} fp16 steps skipped because "
                          "gradients overflowed (the scaler lowered its scale)")
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "lr": scheduler.get_last_lr()[0], "train_images": int(seen), "train_seconds": seconds,
            "optimizer_steps": counters.optimizer_steps, "skipped_steps": counters.skipped_steps}


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, criterion, num_classes: int,
             return_predictions: bool = False) -> dict | tuple[dict, Predictions]:
    """Loss, accuracy (and top-5 with >= 5 classes) over every validation image exactly once.

    With return_predictions, also every image's label and top-1 prediction (for the confusion
    matrix) and a few of this process's images with theirs (for the prediction grid).
    """
    model.eval()
    per_sample = nn.CrossEntropyLoss(reduction="none", label_smoothing=criterion.label_smoothing)
    losses, hits, hits5, all_labels, all_top1 = [], [], [], [], []
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    kept, seen_locally = 0, 0
    # The validation order is sorted by class: pick grid images spread over the whole shard, not
    # the first batch (which would show one class).
    stride = max(1, math.ceil(len(loader.dataset) / accelerator.num_processes) // SAMPLE_IMAGES)
    k = min(5, num_classes)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)
        loss = per_sample(logits.float(), labels)
        top = logits.topk(k, dim=1).indices
        if return_predictions and kept < SAMPLE_IMAGES:
            # Local images, no collective: the grid shows part of the main process's shard.
            positions = torch.arange(seen_locally, seen_locally + len(labels), device=labels.device)
            pick = (positions % stride == 0).nonzero().squeeze(1)[:SAMPLE_IMAGES - kept]
            samples.append((images[pick].float().cpu(), labels[pick].cpu(), top[pick, 0].cpu()))
            kept += len(pick)
        seen_locally += len(labels)
        # gather_for_metrics drops the samples the distributed sampler duplicated for even shards.
        loss, labels, top = accelerator.gather_for_metrics((loss, labels, top))
        losses.append(loss.double())
        hits.append(top[:, 0] == labels)
        hits5.append((top == labels[:, None]).any(1))
        if return_predictions:
            all_labels.append(labels.cpu())
            all_top1.append(top[:, 0].cpu())
    n = sum(len(h) for h in hits)
    stats = {"val_loss": torch.cat(losses).sum().item() / n, "val_acc": torch.cat(hits).double().sum().item() / n}
    if num_classes >= 5:
        stats["val_top5"] = torch.cat(hits5).double().sum().item() / n
    stats["val_images"] = n
    if not math.isfinite(stats["val_loss"]):
        accelerator.print("warning: validation loss is not finite")
    if not return_predictions:
        return stats
    predictions = Predictions(
        labels=torch.cat(all_labels).numpy(), predicted=torch.cat(all_top1).numpy(),
        sample_images=torch.cat([s[0] for s in samples]), sample_labels=torch.cat([s[1] for s in samples]).tolist(),
        sample_predicted=torch.cat([s[2] for s in samples]).tolist())
    return stats, predictions
