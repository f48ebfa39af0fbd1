"""The run's state while it trains: where it stands (`counters.Position`), what it has achieved
(`history.RunHistory`) and its resumable checkpoints, written every `train.checkpoint_every_steps`
steps and at each epoch end. Resuming (`restore`) and stopping on a signal (`signals`) are their
own modules; this one ties them to the loop. Built before anything is written, so a resume that
cannot work is refused first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from configs.schema import Config
from trainer.files.checkpoints import load_checkpoint, mark_best, rng_state, rotate, save_checkpoint, scheduler_state, set_aside
from trainer.files.faults import crash_point
from trainer.fit.counters import Position
from trainer.fit.history import RunHistory
from trainer.task.best_metric import best_metric_of
from trainer.fit.restore import (Trainables, adopt_recorded_config, announce_schedule, find_checkpoint, restore,
                                resume_point)
from trainer.fit.signals import EXIT_PREEMPTED, Preempted, StopSignals


class RunState:
    """Epoch, step and position of the run, its history, and its checkpoints."""

    def __init__(self, accelerator, cfg: Config, run_dir: Path):
        """Finds the checkpoint run.resume names, before the run is built: its class order is the
        run's (`recorded_classes`). Damaged checkpoints `auto` passed over are set aside in `attach`."""
        self.accelerator, self.cfg = accelerator, cfg
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.at = Position()
        self.history = RunHistory(best_metric_of(cfg))
        self.signals = StopSignals(accelerator, self.root)
        self.epoch_start_lrs: list[float] = []  # learning rates when the current epoch started, per group
        self._damaged: list[Path] = []
        self._found = find_checkpoint(cfg.run.resume, self.root, self.warn, self._damaged)
        for note in adopt_recorded_config(self._found, cfg) if self._found else ():
            if accelerator.is_main_process:
                print(f"note: {note}", flush=True)
        self.recorded_classes: list[str] | None = self._found[1]["class_names"] if self._found else None

    def check_resume(self, classes: list[str]) -> None:
        """Refuse the config changes the checkpoint cannot take (the built run's `classes` included),
        before anything is written."""
        self.classes = classes
        self.resume = resume_point(self.cfg, self._found, classes, self.warn)
        self.resumed_from: Path | None = self.resume.folder if self.resume else None
        self.wandb_run_id = self.resume.state.get("wandb_run_id", "") if self.resume else ""

    def warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", flush=True)

    # ---- after accelerator.prepare ----

    def attach(self, held: Trainables, wandb_run_id: str | None = None) -> None:
        """Remember what a checkpoint holds; put the saved state back when resuming; catch signals."""
        self.held = held
        acc = self.accelerator
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):  # a write that a kill interrupted
                shutil.rmtree(stale, ignore_errors=True)
            for folder in self._damaged:  # out of the way of rotation and of the next `auto`
                self.warn(f"moved damaged checkpoint to {set_aside(folder)}")
        if self.resume is not None:
            loaded = load_checkpoint(self.resume.folder, acc.process_index, self.resume.state)
            self.at, self.history = restore(loaded, held, self.cfg, acc, self.warn)
            if acc.is_main_process:
                print(f"resumed from {loaded.folder}: epoch {self.epoch}, {self.at.samples_done} samples into it, "
                      f"step {self.global_step}", flush=True)
                announce_schedule(self.resume.state, self.cfg, held.scheduler, self.global_step)
        if wandb_run_id:
            self.wandb_run_id = wandb_run_id
        self.signals.install()

    # ---- the epoch loop ----

    @property
    def epoch(self) -> int:
        return self.at.epoch

    @property
    def global_step(self) -> int:
        return self.at.global_step

    @property
    def _sampler(self):
        return self.held.batches.sampler

    @property
    def stopped_early(self) -> bool:
        return self.history.patience_spent(self.cfg.train.early_stopping_patience)

    def epochs(self) -> range:
        """The epochs left to train: none when a resumed run had already stopped early."""
        return range(self.cfg.train.epochs + 1 if self.stopped_early else self.epoch, self.cfg.train.epochs + 1)

    @property
    def batch_in_epoch(self) -> int:
        """0-based index of the next batch in the epoch, the same before and after a resume."""
        return self.at.samples_done // self._sampler.samples_per_step

    @property
    def batches_done(self) -> int:
        """Batches trained in the whole run (this process's count): the x axis of train_steps.jsonl."""
        return (self.epoch - 1) * self._sampler.steps_per_epoch + self.batch_in_epoch

    def record_epoch(self, metrics: dict) -> bool:
        """The epoch's metrics into the history; True when they are the new best."""
        return self.history.record(metrics)

    def begin_epoch(self, epoch: int) -> None:
        """Point the sampler at this epoch's order, after the samples a checkpoint already trained on."""
        at = self.at
        if epoch != at.epoch:
            at.epoch, at.samples_done, at.totals = epoch, 0, None
        if at.samples_done == 0 or at.saved_start_lrs is None:
            self.epoch_start_lrs = self.held.scheduler.get_last_lr()
        else:
            self.epoch_start_lrs = at.saved_start_lrs
        at.saved_start_lrs = None
        self._sampler.start_epoch(epoch, at.samples_done)

    def epoch_totals(self, device, counters=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss sum, correct and seen of the epoch so far on this process: zeros, or the checkpoint's
        (which also sets the epoch's optimizer-step `counters`)."""
        loss_sum, correct, seen, *steps = self.at.totals or (0.0, 0, 0)
        self.at.totals = None
        if counters is not None and len(steps) == 2:
            counters.optimizer_steps, counters.skipped_steps = steps
        return (torch.tensor(loss_sum, device=device, dtype=torch.float64),
                torch.tensor(correct, device=device, dtype=torch.long),
                torch.tensor(seen, device=device, dtype=torch.long))

    def step_done(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor, counters=None) -> None:
        """Count a finished batch; at optimizer steps, checkpoint every N of them, and on SIGTERM/SIGINT
        checkpoint and exit. Only at optimizer steps: accumulated gradients are not part of a checkpoint."""
        sampler, at = self._sampler, self.at
        at.samples_done = min(at.samples_done + sampler.samples_per_step, sampler.padded_size)
        if not self.accelerator.sync_gradients:
            return
        at.global_step += 1
        crash_point("after_step", at.global_step)
        every = self.cfg.train.checkpoint_every_steps
        stop = self.signals.agreed(at.global_step, last_of_epoch=at.samples_done >= sampler.padded_size)
        # The epoch-end checkpoint follows the last step anyway.
        periodic = every and at.global_step % every == 0 and at.samples_done < sampler.padded_size
        if periodic or stop:
            if counters is not None:  # never a checkpoint of weights a non-finite loss reached
                counters.raise_if_nonfinite(self.accelerator, f"epoch {self.epoch}")
            steps = (counters.optimizer_steps, counters.skipped_steps) if counters is not None else ()
            folder = self._save(False, (loss_sum, correct, seen, *steps))
        if stop:
            self.accelerator.print(f"stopped by signal {self.signals.name} after step "
                                   f"{at.global_step}; checkpoint {folder}; exit code {EXIT_PREEMPTED}. "
                                   f"Continue with run.resume=auto")
            # Handlers stay until the trackers are finished: a launcher's SIGTERM to every rank once one
            # has exited (torch elastic does this) must not kill a rank that is still finishing W&B.
            self.accelerator.end_training()
            self.close()
            raise Preempted(folder)

    def end_epoch(self, epoch: int, improved: bool) -> None:
        """The epoch-end checkpoint, after the epoch's record is in the history."""
        self.at.samples_done = self._sampler.padded_size
        self._save(True, None, improved=improved)
        crash_point("epoch_end", epoch)
        self.at.epoch = epoch
        self.at.next_epoch()

    def close(self) -> None:
        self.signals.close()

    # ---- writing ----

    def _save(self, epoch_complete: bool, totals, improved: bool = False) -> Path:
        acc, at, held = self.accelerator, self.at, self.held
        model_state = held.model.state_dict()
        cpu_rng, py_np_rng = rng_state()
        rank_json = dict(py_np_rng)
        if totals is not None:
            rank_json["totals"] = [totals[0].item(), int(totals[1].item()), int(totals[2].item()), *totals[3:]]
        sampler = self._sampler
        trainer_state = {
            "epoch": at.epoch, "epoch_complete": epoch_complete, "samples_done": at.samples_done,
            "global_step": at.global_step,
            "samples_seen": (at.epoch - 1) * sampler.padded_size + at.samples_done,
            **self.history.to_state(), "best_metric": self.cfg.train.best_metric, "wandb_run_id": self.wandb_run_id,
            "scheduler": scheduler_state(held.scheduler),
            "scaler": held.scaler.state_dict() if held.scaler is not None else None,
            "class_names": self.classes, "config": self.cfg.to_dict(),
            "best_folder": f"step-{at.global_step:08d}" if improved else at.best_name,
            "epoch_start_lrs": self.epoch_start_lrs,
            "ema": held.ema.to_state() if held.ema is not None else None,
            "order_key": sampler.order_key,
        }
        folder = save_checkpoint(acc, self.root, at.global_step, model_state=model_state,
                                 optimizer_state=held.optimizer.state_dict() if acc.is_main_process else {},
                                 trainer_state=trainer_state, rank_tensors=cpu_rng, rank_json=rank_json,
                                 ema_state=held.ema.state_dict() if held.ema is not None else None)
        if acc.is_main_process:
            if improved:
                mark_best(self.root, folder)
            rotate(self.root, self.cfg.train.keep_last)
        if improved:
            at.best_name = folder.name
        acc.wait_for_everyone()
        return folder
