"""Where a run stands, what it has achieved, and how it stops and continues.

`Progress` is the one owner of the run's state: epoch, optimizer step, position in the epoch and
the history (`RunHistory`: one record per finished epoch, the best one, the early-stopping
count). The loop updates it, the training-state checkpoint serializes it, and metrics.jsonl,
curves.png and W&B read it, so after a resume they continue without a gap or a repeat.

It also finds the checkpoint to resume from (`run.resume`), refuses config changes that would
not fit it, puts the saved state back after `accelerator.prepare`, counts steps, writes a
checkpoint every `train.checkpoint_every_steps` steps and at each epoch end, and turns SIGTERM or
SIGINT into "finish this step, write a checkpoint, exit with EXIT_PREEMPTED".

Exit codes of `launch/train.py`: 0 done, 2 bad input, 75 (EX_TEMPFAIL, "try again") preempted by
SIGTERM/SIGINT after writing a checkpoint: run the same command with run.resume=auto to continue.
"""

from __future__ import annotations

import json
import math
import signal
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs.schema import Config
from data.files import atomic_write_text
from models.build import bare_keys
from configs.errors import UsageError
from trainer.fit.ema import PREFIX, WeightEma, better_weights, check_resumable, score
from trainer.files.faults import crash_point
from trainer.files.checkpoints import (DamagedCheckpoint, LoadedState, complete_checkpoints, load_checkpoint,
                           load_scheduler_state, mark_best, newest_valid, rng_state, rotate, save_checkpoint, set_aside,
                           scheduler_state, set_rng_state, verify)

EXIT_PREEMPTED = 75
# With several processes, how often (in optimizer steps) they agree whether any was signalled.
STOP_CHECK_EVERY = 8

# Keys whose change makes a checkpoint meaningless for the new config: a different network, a
# different optimizer state layout, or a different train/validation split.
REFUSED_CHANGES = ("model.name", "model.head", "model.head_hidden", "model.head_dropout", "model.freeze",
                   "model.bn", "optim.name", "optim.layer_decay", "data.val_fraction", "data.seed", "data.source",
                   "data.task")
# What a checkpoint written before a key existed trained with (not the key's default today).
_BEFORE_THE_KEY = {"optim.no_decay_norm_bias": False}
# Keys that change nothing about what has been trained so far; anything else is allowed with a
# warning that the continuation differs from the uninterrupted run.
SAFE_CHANGES = ("train.epochs", "train.log_every_steps", "train.progress_every_seconds", "train.checkpoint_every_steps", "train.keep_last",
                "train.early_stopping_patience", "data.root", "data.num_workers", "run.", "wandb.")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with EXIT_PREEMPTED."""

    def __init__(self, folder: Path):
        super().__init__(EXIT_PREEMPTED)
        self.folder = folder


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


@dataclass
class RunHistory:
    """One record per finished epoch (the lines of metrics.jsonl), the best of them and how many
    epochs have passed without beating it."""

    best_metric: str  # train.best_metric: val_acc (higher is better) or val_loss (lower)
    epochs: list[dict] = field(default_factory=list)
    best: dict | None = None
    epochs_without_improvement: int = 0

    def record(self, metrics: dict) -> bool:
        """Add an epoch's metrics; True when it is the new best. With EMA weights evaluated too
        (ema_val_*), an epoch scores by the better of its raw and EMA weights, named in `best_weights`."""
        now = score(metrics, self.best_metric)
        if self.best is None:
            improved = True
        elif self.best_metric == "val_acc":
            improved = now > score(self.best, self.best_metric)
        else:
            improved = now < score(self.best, self.best_metric)
        record = {**metrics, "is_best": improved}
        if PREFIX + self.best_metric in metrics:
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
    def from_state(cls, best_metric: str, state: dict) -> "RunHistory":
        return cls(best_metric, list(state["history"]), state["best"], state["epochs_without_improvement"])


class Progress:
    """Epoch, step and position of the run, its history, and its checkpoints. Built before anything
    is written."""

    def __init__(self, accelerator, cfg: Config, run_dir: Path, classes: list[str]):
        self.accelerator, self.cfg, self.classes = accelerator, cfg, classes
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.epoch, self.samples_done, self.global_step = 1, 0, 0
        self.history = RunHistory(cfg.train.best_metric)
        self.wandb_run_id = ""
        self._stop_signal: int | None = None
        self._previous_handlers: dict = {}
        self._totals: list | None = None  # running totals of the epoch in progress, from a checkpoint
        self._best_folder: Path | None = None
        self.epoch_start_lrs: list[float] = []  # learning rates when the current epoch started, per group
        self._saved_start_lrs: list[float] | None = None
        self._damaged: list[Path] = []
        found = find_checkpoint(cfg.run.resume, self.root, self.warn, self._damaged)
        self.resumed_from: Path | None = None
        self._state: dict = {}
        if found:
            folder, state = found
            for message in config_changes(state["config"], cfg, state["class_names"], classes):
                self.warn(message)
            check_resumable(state.get("ema"), cfg.train.ema_decay)
            self.resumed_from, self._state = folder, state
            self.wandb_run_id = state.get("wandb_run_id", "")

    def warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", flush=True)

    # ---- after accelerator.prepare ----

    def attach(self, model, optimizer, scheduler, batches, scaler=None, wandb_run_id: str | None = None,
               ema: WeightEma | None = None) -> None:
        """Remember what a checkpoint holds; put the saved state back when resuming; catch signals.

        `model` is the module that trains, unwrapped (no DDP, DataParallel or compile wrapper), so
        checkpoint keys never carry a wrapper's prefix; `ema` the run's average of the weights, if any."""
        self.model, self.optimizer, self.scheduler, self.batches, self.scaler = model, optimizer, scheduler, batches, scaler
        self.ema = ema
        acc = self.accelerator
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # a write that a kill interrupted
                shutil.rmtree(stale, ignore_errors=True)
            for folder in self._damaged:  # out of the way of rotation and of the next `auto`
                self.warn(f"moved damaged checkpoint to {set_aside(folder)}")
        if self.resumed_from is not None:
            self._restore(load_checkpoint(self.resumed_from, acc.process_index, self._state))
        if wandb_run_id:
            self.wandb_run_id = wandb_run_id
        self._install_signal_handlers()

    def _restore(self, loaded: LoadedState) -> None:
        acc, s = self.accelerator, loaded.state
        # Checkpoints written before keys were saved bare may carry a compile or DDP prefix.
        self.model.load_state_dict(bare_keys(loaded.model))
        self.optimizer.load_state_dict(loaded.optimizer)
        if self.ema is not None:  # check_resumable made sure the checkpoint has one
            self.ema.load(loaded.ema, s["ema"])
        if self.scaler is not None and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.history = RunHistory.from_state(self.cfg.train.best_metric, s)
        self.epoch, self.samples_done, self.global_step = s["epoch"], s["samples_done"], s["global_step"]
        if s["epoch_complete"]:
            self.epoch, self.samples_done = self.epoch + 1, 0
        self._best_folder = self.root / s["best_folder"] if s.get("best_folder") else None
        self._saved_start_lrs = s.get("epoch_start_lrs")
        sampler = self.batches.sampler
        same_world = s["num_processes"] == acc.num_processes
        sched = dict(s["scheduler"])
        if same_world:
            set_rng_state(loaded.rank_tensors, loaded.rank_json)
            self._totals = loaded.rank_json["totals"] if not s["epoch_complete"] else None
        else:
            self.warn(f"resuming a {s['num_processes']}-process checkpoint with {acc.num_processes} processes: "
                      f"training continues from the same {s['samples_seen']} samples seen, but results will not "
                      f"be bitwise identical to an uninterrupted run")
            # Same samples seen: the step counter and the schedule are recounted in the new steps.
            accum = self.cfg.train.grad_accum_steps
            done_epochs = self.epoch - 1
            self.global_step = (done_epochs * math.ceil(sampler.steps_per_epoch / accum)
                                + self.samples_done // sampler.samples_per_step // accum)
            sched["last_epoch"] = sched["_step_count"] = self.global_step
            sched["_step_count"] += 1
            torch.manual_seed(s["global_step"] * 1000 + acc.process_index)
            if not s["epoch_complete"] and acc.is_main_process:
                totals = [json.loads((loaded.folder / f"rank-{r}.json").read_text())["totals"]
                          for r in range(s["num_processes"])]
                self._totals = [sum(t[i] for t in totals) for i in range(3)] + list(totals[0][3:])
            elif not s["epoch_complete"]:
                self._totals = [0.0, 0, 0]
        # What else the epoch's order depends on (data.shards: the loader workers); another process
        # count was announced above.
        saved_key, key_now = s.get("order_key", {}), sampler.order_key
        if same_world and saved_key != key_now:
            key = next(k for k in sorted({*saved_key, *key_now}) if saved_key.get(k) != key_now.get(k))
            old = saved_key.get(key)
            self.warn(f"the checkpoint's training order was drawn for {key}={old}, this run's for {key}="
                      f"{key_now.get(key)}: training continues from the same {s['samples_seen']} samples "
                      f"seen but results will not be bitwise identical (set {key}={old} to resume exactly)")
        load_scheduler_state(self.scheduler, sched)
        if acc.is_main_process:
            self._trim_log("metrics.jsonl", "epoch", self.epoch - 1)
            self._trim_log("train_steps.jsonl", "step", self.batches_done)
            print(f"resumed from {loaded.folder}: epoch {self.epoch}, {self.samples_done} samples into it, "
                  f"step {self.global_step}", flush=True)
            self._announce_schedule(s)

    def _trim_log(self, name: str, key: str, last: int) -> None:
        """Drop the lines a killed run wrote after its checkpoint: those epochs and batches are
        trained (and logged) again, so the log continues without a repeat."""
        path = self.run_dir / name
        if path.is_file():
            lines = [line for line in path.read_text().splitlines()
                     if line.strip() and json.loads(line)[key] <= last]
            atomic_write_text(path, "".join(line + "\n" for line in lines))

    def _announce_schedule(self, saved: dict) -> None:
        """The schedule is a function of train.epochs and [optim]; if those changed, say in one line
        what it does now (a longer run re-stretches a cosine schedule)."""
        old, new = saved["config"], self.cfg.to_dict()
        keys = [f"train.epochs {old['train']['epochs']} -> {new['train']['epochs']}"] \
            if old["train"]["epochs"] != new["train"]["epochs"] else []
        keys += [f"optim.{k} {v!r} -> {new['optim'][k]!r}" for k, v in old.get("optim", {}).items()
                 if k in new["optim"] and new["optim"][k] != v]
        if not keys:
            return
        sched = self.scheduler
        was = saved["scheduler"].get("_last_lr", [])[:1]
        now = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)][:1]
        print(f"note: resuming with changed {', '.join(keys)}: the learning-rate schedule is recomputed for "
              f"{self.cfg.train.epochs} epochs; at step {self.global_step} the head's rate goes from "
              f"{was[0] if was else float('nan'):.3g} to {now[0]:.3g}", flush=True)

    # ---- the epoch loop ----

    @property
    def stopped_early(self) -> bool:
        return self.history.patience_spent(self.cfg.train.early_stopping_patience)

    def epochs(self) -> range:
        """The epochs left to train: none when a resumed run had already stopped early."""
        return range(self.cfg.train.epochs + 1 if self.stopped_early else self.epoch, self.cfg.train.epochs + 1)

    @property
    def batch_in_epoch(self) -> int:
        """0-based index of the next batch in the epoch, the same before and after a resume."""
        return self.samples_done // self.batches.sampler.samples_per_step

    @property
    def batches_done(self) -> int:
        """Batches trained in the whole run (this process's count): the x axis of train_steps.jsonl."""
        return (self.epoch - 1) * self.batches.sampler.steps_per_epoch + self.batch_in_epoch

    def record_epoch(self, metrics: dict) -> bool:
        """The epoch's metrics into the history; True when they are the new best."""
        return self.history.record(metrics)

    def begin_epoch(self, epoch: int) -> None:
        """Point the sampler at this epoch's order, after the samples a checkpoint already trained on."""
        if epoch != self.epoch:
            self.epoch, self.samples_done, self._totals = epoch, 0, None
        if self.samples_done == 0 or self._saved_start_lrs is None:
            self.epoch_start_lrs = self.scheduler.get_last_lr()
        else:
            self.epoch_start_lrs = self._saved_start_lrs
        self._saved_start_lrs = None
        self.batches.start_epoch(epoch, self.samples_done)

    def epoch_totals(self, device, counters=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss sum, correct and seen of the epoch so far on this process: zeros, or the checkpoint's
        (which also sets the epoch's optimizer-step `counters`)."""
        loss_sum, correct, seen, *steps = self._totals or (0.0, 0, 0)
        self._totals = None
        if counters is not None and len(steps) == 2:
            counters.optimizer_steps, counters.skipped_steps = steps
        return (torch.tensor(loss_sum, device=device, dtype=torch.float64),
                torch.tensor(correct, device=device, dtype=torch.long),
                torch.tensor(seen, device=device, dtype=torch.long))

    def step_done(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor, counters=None) -> None:
        """Count a finished batch; at optimizer steps, checkpoint every N of them, and on SIGTERM/SIGINT
        checkpoint and exit. Only at optimizer steps: accumulated gradients are not part of a checkpoint."""
        sampler = self.batches.sampler
        self.samples_done = min(self.samples_done + sampler.samples_per_step, sampler.padded_size)
        if not self.accelerator.sync_gradients:
            return
        self.global_step += 1
        crash_point("after_step", self.global_step)
        every = self.cfg.train.checkpoint_every_steps
        stop = self._should_stop()
        # The epoch-end checkpoint follows the last step anyway.
        periodic = every and self.global_step % every == 0 and self.samples_done < sampler.padded_size
        if periodic or stop:
            if counters is not None:  # never a checkpoint of weights a non-finite loss reached
                counters.raise_if_nonfinite(self.accelerator, f"epoch {self.epoch}")
            steps = (counters.optimizer_steps, counters.skipped_steps) if counters is not None else ()
            folder = self._save(False, (loss_sum, correct, seen, *steps))
        if stop:
            self.accelerator.print(f"stopped by signal {signal.Signals(self._stop_signal).name} after step "
                                   f"{self.global_step}; checkpoint {folder}; exit code {EXIT_PREEMPTED}. "
                                   f"Continue with run.resume=auto")
            self.close()
            self.accelerator.end_training()
            raise Preempted(folder)

    def end_epoch(self, epoch: int, improved: bool) -> None:
        """The epoch-end checkpoint, after the epoch's record is in the history."""
        self.samples_done = self.batches.sampler.padded_size
        self._save(True, None, improved=improved)
        crash_point("epoch_end", epoch)
        self.epoch, self.samples_done = epoch + 1, 0

    def close(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    # ---- writing ----

    def _save(self, epoch_complete: bool, totals, improved: bool = False) -> Path:
        acc = self.accelerator
        model_state = self.model.state_dict()
        cpu_rng, py_np_rng = rng_state()
        rank_json = dict(py_np_rng)
        if totals is not None:
            rank_json["totals"] = [totals[0].item(), int(totals[1].item()), int(totals[2].item()), *totals[3:]]
        best_folder = self._best_folder
        sampler = self.batches.sampler
        trainer_state = {
            "epoch": self.epoch, "epoch_complete": epoch_complete, "samples_done": self.samples_done,
            "global_step": self.global_step,
            "samples_seen": (self.epoch - 1) * sampler.padded_size + self.samples_done,
            **self.history.to_state(), "best_metric": self.cfg.train.best_metric, "wandb_run_id": self.wandb_run_id,
            "scheduler": scheduler_state(self.scheduler),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "class_names": self.classes, "config": self.cfg.to_dict(),
            "best_folder": best_folder.name if best_folder else None,
            "epoch_start_lrs": self.epoch_start_lrs,
            "ema": self.ema.to_state() if self.ema is not None else None,
            "order_key": sampler.order_key,
        }
        if improved:
            trainer_state["best_folder"] = f"step-{self.global_step:08d}"
        folder = save_checkpoint(acc, self.root, self.global_step, model_state=model_state,
                                 optimizer_state=self.optimizer.state_dict() if acc.is_main_process else {},
                                 trainer_state=trainer_state, rank_tensors=cpu_rng, rank_json=rank_json,
                                 ema_state=self.ema.state_dict() if self.ema is not None else None)
        if acc.is_main_process:
            if improved:
                mark_best(self.root, folder)
            rotate(self.root, self.cfg.train.keep_last)
        if improved:
            self._best_folder = folder
        acc.wait_for_everyone()
        return folder

    # ---- signals ----

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        """Whether any process was signalled; every process must take the same decision at the same step."""
        if self.accelerator.num_processes == 1:
            return self._stop_signal is not None
        last_of_epoch = self.samples_done >= self.batches.sampler.padded_size
        if self.global_step % STOP_CHECK_EVERY and not last_of_epoch:
            return False  # agreeing is a collective the host waits for: not every step
        flag = torch.tensor([int(self._stop_signal is not None)], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return bool(flag.item())

