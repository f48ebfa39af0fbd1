"""Resuming: which checkpoint `run.resume` names, which config changes it can take, and putting
its state back into the model, optimizer, schedule, EMA, scaler, sampler and RNGs after
`accelerator.prepare`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from configs.errors import UsageError
from configs.schema import Config, changed_meaning_notes
from models.build import bare_keys
from trainer.files.checkpoints import (DamagedCheckpoint, LoadedState, complete_checkpoints, load_scheduler_state,
                                       newest_valid, set_rng_state, verify)
from trainer.fit.counters import Position
from trainer.fit.ema import WeightEma, check_resumable
from trainer.fit.history import RunHistory
from trainer.task.best_metric import best_metric_of

# Keys whose change makes a checkpoint meaningless for the new config: a different network, a
# different optimizer state layout, or a different train/validation split.
REFUSED_CHANGES = ("model.name", "model.head", "model.head_hidden", "model.head_dropout", "model.freeze",
                   "model.bn", "optim.name", "optim.layer_decay", "data.val_fraction", "data.seed", "data.source",
                   "data.task")
# What a checkpoint written before a key existed trained with (not the key's default today); a run
# resuming it with the key at its default takes this value (`adopt_recorded_config`).
_BEFORE_THE_KEY = {"optim.no_decay_norm_bias": False}
# Keys that change nothing about what has been trained so far; anything else is allowed with a
# warning that the continuation differs from the uninterrupted run.
SAFE_CHANGES = ("train.epochs", "train.log_every_steps", "train.progress_every_seconds", "train.checkpoint_every_steps", "train.keep_last",
                "train.early_stopping_patience", "data.root", "data.num_workers", "run.", "wandb.")


@dataclass
class Trainables:
    """What a checkpoint holds besides the counters. `model` is the module that trains, unwrapped
    (no DDP, DataParallel or compile wrapper), so checkpoint keys never carry a wrapper's prefix."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    batches: object  # TrainBatches / ShardBatches: `.sampler` is a data.sampling.ResumableOrder
    scaler: object = None
    ema: WeightEma | None = None


@dataclass
class ResumePoint:
    folder: Path
    state: dict  # the checkpoint's state.json


def config_changes(saved: dict, cfg: Config, saved_classes: list[str], classes: list[str]) -> list[str]:
    """Warnings for changed keys; raises UsageError naming the first change that cannot resume."""
    if saved_classes != classes:
        added, gone = sorted(set(classes) - set(saved_classes)), sorted(set(saved_classes) - set(classes))
        detail = f"added {added}, missing {gone}" if added or gone else "same names in another order"
        raise UsageError(f"cannot resume: the classes differ from the checkpoint's ({detail}); "
                         f"point data.root at the same classes or start a new run.dir")
    changed = []
    for section, table in cfg.to_dict().items():
        for key, value in table.items():
            dotted = f"{section}.{key}"
            old = saved.get(section, {}).get(key, _BEFORE_THE_KEY.get(dotted, value))
            if old != value:
                # The weight-decay exemptions change the optimizer's groups only with weight decay.
                exemptions = dotted == "optim.no_decay_norm_bias"
                if exemptions and cfg.optim.weight_decay == 0:
                    continue
                if dotted in REFUSED_CHANGES or exemptions:
                    raise UsageError(f"cannot resume: {dotted} is {value!r} but the checkpoint was trained with "
                                     f"{old!r}; set {dotted}={old!r} or start a new run.dir")
                if not any(dotted == s or (s.endswith(".") and dotted.startswith(s)) for s in SAFE_CHANGES):
                    changed.append(f"{dotted} {old!r} -> {value!r}")
    return [f"resuming with changed {c}: the rest of the run will differ from an uninterrupted one"
            for c in changed]


def adopt_recorded_config(found: tuple[Path, dict], cfg: Config) -> list[str]:
    """Before the run is built from `cfg`: where the checkpoint `find_checkpoint` found predates a
    key and `cfg` holds that key's default, set it to what the checkpoint trained with, so an old
    run resumes without hand-set keys. Returns notes: those keys, and the recorded values whose
    meaning has changed since (unless the config file already said so)."""
    folder, state = found
    saved, defaults, notes = state["config"], Config().to_dict(), []
    for dotted, old in _BEFORE_THE_KEY.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if key in saved.get(section, {}) or value == old or value != defaults[section][key]:
            continue  # recorded, or already the old value, or set by the user: config_changes decides
        setattr(getattr(cfg, section), key, old)
        notes.append(f"the checkpoint in {folder} predates {dotted}, so it trained with {dotted}={old!r}: "
                     f"resuming with that (config.toml records it)")
    if not cfg.read_notes:
        notes += changed_meaning_notes(saved, f"the checkpoint in {folder}", cfg)
    return notes


def find_checkpoint(resume: str, root: Path, warn, skipped: list[Path] | None = None) -> tuple[Path, dict] | None:
    """What `run.resume` points at: "auto" the newest valid checkpoint (or None), a path that one."""
    if resume == "":
        if complete_checkpoints(root):
            raise UsageError(f"{root} already holds checkpoints: set run.resume=auto to continue that run, "
                             f"or choose another run.dir")
        return None
    if resume == "auto":
        skipped = [] if skipped is None else skipped
        found = newest_valid(root, warn, skipped)
        if found is None and skipped:
            # Starting fresh would overwrite best/last.safetensors and append a second history.
            raise UsageError(f"run.resume=auto: every checkpoint in {root} is damaged ("
                             f"{', '.join(p.name for p in skipped)}, reasons above); nothing was changed. To start "
                             f"fresh keep them and use another run.dir, or move {root} aside")
        return found
    path = Path(resume).expanduser().resolve()
    if (path / "checkpoints").is_dir():  # a run folder: its newest checkpoint
        path = path / "checkpoints"
    if path.is_dir() and not (path / "state.json").exists() and complete_checkpoints(path):
        found = newest_valid(path, warn)
        if found is None:
            raise UsageError(f"run.resume={resume}: no usable checkpoint in {path}")
        return found
    try:
        return path, verify(path)
    except DamagedCheckpoint as e:
        raise UsageError(f"cannot resume from run.resume={resume}: {e}") from None
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot resume from run.resume={resume}: not a training checkpoint ({e})") from None


def resume_point(cfg: Config, found: tuple[Path, dict] | None, classes: list[str],
                 warn: Callable[[str], None]) -> ResumePoint | None:
    """The checkpoint `find_checkpoint` found, after refusing the config changes it cannot take
    (before anything is written); None for a fresh run."""
    if not found:
        return None
    folder, state = found
    for message in config_changes(state["config"], cfg, state["class_names"], classes):
        warn(message)
    check_resumable(state.get("ema"), cfg.train.ema_decay)
    return ResumePoint(folder, state)


def restore(loaded: LoadedState, held: Trainables, cfg: Config, accelerator, warn) -> tuple[Position, RunHistory]:
    """Put a checkpoint's state back; returns where the run stands and its history."""
    s = loaded.state
    # Checkpoints written before keys were saved bare may carry a compile or DDP prefix.
    held.model.load_state_dict(bare_keys(loaded.model))
    held.optimizer.load_state_dict(loaded.optimizer)
    if held.ema is not None:  # check_resumable made sure the checkpoint has one
        held.ema.load(loaded.ema, s["ema"])
    if held.scaler is not None and s.get("scaler"):
        held.scaler.load_state_dict(s["scaler"])
    at = Position(s["epoch"], s["samples_done"], s["global_step"], best_name=s.get("best_folder"),
                  saved_start_lrs=s.get("epoch_start_lrs"))
    if s["epoch_complete"]:
        at.next_epoch()
    sched = dict(s["scheduler"])
    if s["num_processes"] == accelerator.num_processes:
        set_rng_state(loaded.rank_tensors, loaded.rank_json)
        at.totals = loaded.rank_json["totals"] if not s["epoch_complete"] else None
        _warn_other_order(s, held.batches.sampler.order_key, warn)
    else:
        _recount_for_other_world(loaded, at, sched, held.batches.sampler, cfg, accelerator, warn)
    load_scheduler_state(held.scheduler, sched)
    return at, RunHistory.from_state(best_metric_of(cfg), s)


def _recount_for_other_world(loaded: LoadedState, at: Position, sched: dict, sampler, cfg: Config, accelerator,
                             warn) -> None:
    """Another process count: the same samples seen, the step counter and the schedule recounted in
    the new steps, the epoch's running totals summed over the old ranks."""
    s, acc = loaded.state, accelerator
    warn(f"resuming a {s['num_processes']}-process checkpoint with {acc.num_processes} processes: "
         f"training continues from the same {s['samples_seen']} samples seen, but results will not "
         f"be bitwise identical to an uninterrupted run")
    accum = cfg.train.grad_accum_steps
    at.global_step = ((at.epoch - 1) * math.ceil(sampler.steps_per_epoch / accum)
                      + at.samples_done // sampler.samples_per_step // accum)
    sched["last_epoch"] = sched["_step_count"] = at.global_step
    sched["_step_count"] += 1
    torch.manual_seed(s["global_step"] * 1000 + acc.process_index)
    if not s["epoch_complete"] and acc.is_main_process:
        totals = [json.loads((loaded.folder / f"rank-{r}.json").read_text())["totals"]
                  for r in range(s["num_processes"])]
        at.totals = [sum(t[i] for t in totals) for i in range(3)] + list(totals[0][3:])
    elif not s["epoch_complete"]:
        at.totals = [0.0, 0, 0]


def _warn_other_order(s: dict, key_now: dict, warn) -> None:
    """What else the epoch's order depends on (data.shards: the loader workers); another process
    count is announced by `_recount_for_other_world`."""
    saved_key = s.get("order_key", {})
    if saved_key == key_now:
        return
    key = next(k for k in sorted({*saved_key, *key_now}) if saved_key.get(k) != key_now.get(k))
    old = saved_key.get(key)
    warn(f"the checkpoint's training order was drawn for {key}={old}, this run's for {key}="
         f"{key_now.get(key)}: training continues from the same {s['samples_seen']} samples "
         f"seen but results will not be bitwise identical (set {key}={old} to resume exactly)")


def announce_schedule(saved: dict, cfg: Config, scheduler, global_step: int) -> None:
    """The schedule is a function of train.epochs and [optim]; if those changed, say in one line
    what it does now (a longer run re-stretches a cosine schedule)."""
    old, new = saved["config"], cfg.to_dict()
    keys = [f"train.epochs {old['train']['epochs']} -> {new['train']['epochs']}"] \
        if old["train"]["epochs"] != new["train"]["epochs"] else []
    keys += [f"optim.{k} {v!r} -> {new['optim'][k]!r}" for k, v in old.get("optim", {}).items()
             if k in new["optim"] and new["optim"][k] != v]
    if not keys:
        return
    was = saved["scheduler"].get("_last_lr", [])[:1]
    now = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)][:1]
    print(f"note: resuming with changed {', '.join(keys)}: the learning-rate schedule is recomputed for "
          f"{cfg.train.epochs} epochs; at step {global_step} the head's rate goes from "
          f"{was[0] if was else float('nan'):.3g} to {now[0]:.3g}", flush=True)
