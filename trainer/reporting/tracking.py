"""What a run shows: W&B (through Accelerate's tracker API) and the same pictures as local PNGs.

W&B runs on the main process only, so a run has exactly one W&B run whatever the number of
processes. The mode is `wandb.mode`, or `WANDB_MODE` when that is set (the usual switch on
clusters). W&B is a spectator, never a reason to stop: when online mode is asked for but no API
key is configured or the server does not answer within `wandb.init_timeout` seconds, one warning
is printed and the run is recorded offline, to be uploaded later with `wandb sync`.

The local files are written whatever the mode, so a run without W&B tells the same story:
  train_steps.jsonl      train loss, learning rate and throughput every train.log_every_steps
  curves.png             loss and accuracy over the whole run (also across resumes)
  confusion_matrix.png   of the best epoch's validation pass, the one best.safetensors holds
                         (per_class_accuracy.csv beside it); each names its epoch
  predictions.png        the latest epoch's validation images, actual vs predicted, wrong ones
                         framed in red
  train_samples.png      training images after augmentation, as the model sees them
  class_distribution.png images per class in each split
  top_losses.png (.csv), most_confused.csv, label_issues.csv
                         what the best epoch's validation pass got wrong, written at the run's
                         end (trainer/reporting/mistakes.py)
(metrics.jsonl, one line per epoch, is written by trainer/reporting/console.py and logged here; the history
both read is owned by trainer/fit/history.py.)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import WandBTracker, on_main_process

from configs.errors import ConfigError
from configs.schema import Config
from data.files import append_line, atomic_output, is_write_fault, trim_jsonl, write_failed
from data.transforms import Preprocessing
from trainer.reporting.mistakes import MISTAKE_FILES, Evaluated, find_mistakes, write_mistakes
from trainer.task.metrics import confusion_matrix, per_class_accuracy
from trainer.task.single import SAMPLE_IMAGES, ValidationPredictions

MODES = ("online", "offline", "disabled")
# Spellings older wandb versions and their docs still use.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_mode(config_mode: str) -> str:
    """WANDB_MODE, when set, wins over `wandb.mode` so one export turns W&B off or offline."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return config_mode
    mode = _MODE_ALIASES.get(env, env)
    if mode not in MODES:
        raise ConfigError(f"WANDB_MODE={env!r} is not one of: {', '.join(MODES)} (unset it to use wandb.mode)")
    return mode


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class FallbackWandBTracker(WandBTracker):
    """Accelerate's W&B tracker whose start never stops training: online problems -> offline."""

    def __init__(self, project: str, mode: str, init_timeout: float, **init_kwargs: Any):
        super().__init__(project, **init_kwargs)
        self.mode = mode
        self.init_timeout = init_timeout
        self.warnings: list[str] = []

    @on_main_process
    def start(self):
        import wandb

        settings = wandb.Settings(init_timeout=self.init_timeout)
        mode = self.mode
        if mode == "online":
            problem = self._online_problem(wandb)
            if problem is None:
                folders = self._run_folders()
                try:
                    self.run = wandb.init(project=self.run_name, mode="online", settings=settings,
                                          **self.init_kwargs)
                    return
                except Exception as e:  # CommError (unreachable, timeout), AuthenticationError (bad key)
                    problem = f"could not start an online run ({_first_line(e)})"
                    self._remove_failed_attempt(folders)
            self.warn(f"warning: W&B {problem}; training goes on with W&B offline "
                      f"(upload later with `wandb sync {self._wandb_dir()}/offline-run-*`)")
            mode = "offline"
        self.run = wandb.init(project=self.run_name, mode=mode, settings=settings, **self.init_kwargs)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(message, file=sys.stderr, flush=True)

    @staticmethod
    def _online_problem(wandb) -> str | None:
        # prompt=False: a run started from a terminal must not sit at wandb's login prompt.
        try:
            if not wandb.login(prompt=False, verify=False):
                return "is not logged in (run `wandb login` or set WANDB_API_KEY)"
        except Exception as e:
            return f"login failed ({_first_line(e)})"
        return None

    def _wandb_dir(self) -> Path:
        return Path(self.init_kwargs.get("dir") or ".") / "wandb"

    def _run_folders(self) -> set[str]:
        folder = self._wandb_dir()
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def _remove_failed_attempt(self, before: set[str]) -> None:
        # A failed online init leaves a run folder holding only logs; one run, one folder.
        for name in self._run_folders() - before:
            if name.startswith("run-"):
                shutil.rmtree(self._wandb_dir() / name, ignore_errors=True)

    @on_main_process
    def store_init_configuration(self, values: dict):
        self.run.config.update(values, allow_val_change=True)


def wandb_trackers(cfg: Config) -> list[FallbackWandBTracker]:
    """The trackers handed to `Accelerator(log_with=...)`: none when W&B is disabled."""
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        return []
    w = cfg.wandb
    init: dict[str, Any] = {"dir": str(Path(cfg.run.dir).expanduser().resolve()), "tags": w.tags or None}
    init |= {k: v for k, v in (("entity", w.entity), ("name", w.name), ("group", w.group), ("notes", w.notes)) if v}
    return [FallbackWandBTracker(w.project, mode, w.init_timeout, **init)]


class _Drawing:
    """One function run in a thread; `wait` joins it and raises what it raised. Not a daemon: a
    run that ends before the first epoch does still finishes its pictures."""

    def __init__(self, draw):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(draw,), name="imgtrain-plots")
        self._thread.start()

    def _run(self, draw) -> None:
        try:
            draw()
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


class RunTracking:
    """Every method is a no-op off the main process, so callers need no rank checks."""

    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path, class_names: list[str],
                 preprocessing: Preprocessing):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.class_names = list(class_names)
        self.mean, self.std = preprocessing.mean, preprocessing.std
        self.project = cfg.wandb.project
        self.log_model = cfg.wandb.log_model
        self.tracker: FallbackWandBTracker | None = None
        self._mark: tuple[int, int, float] | None = None  # (epoch, global step, time) of the last step log
        self._data_plots: _Drawing | None = None  # drawn beside the first steps, logged at the first epoch's end

    @property
    def active(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run(self):
        return self.tracker.run if self.tracker is not None else None

    def start(self, config: dict, run_id: str | None = None) -> str | None:
        """Start the W&B run (continuing run `run_id` when given); return the id in use.

        Every process must call this (Accelerate's init_trackers); only the main process gets
        the id back, the others get None, like every other tracker call on them.
        """
        trackers = [t for t in self.accelerator.log_with if isinstance(t, FallbackWandBTracker)]
        if not trackers:
            return None
        self.tracker = trackers[0]
        if run_id:
            self.tracker.init_kwargs.update(id=run_id, resume="allow")
        self.accelerator.init_trackers(self.project, config=config)
        if not self.active:
            return None
        run = self.run
        # Each family of keys gets its own x axis, so per-step and per-epoch logs never fight over
        # W&B's single `_step` counter (which also keeps a resumed run consistent).
        run.define_metric("train_step/step")
        run.define_metric("train_step/*", step_metric="train_step/step")
        run.define_metric("epoch")
        for family in ("epoch/*", "media/*"):
            run.define_metric(family, step_metric="epoch")
        where = f"{run.dir.rsplit('/files', 1)[0]}" if run.dir else ""
        print(f"wandb    {run.settings.mode} run {run.id} ({run.project}) {where}", flush=True)
        return run.id

    # ---- data, before training ----

    def show_data(self, train_ds, split_counts: dict[str, dict[str, int]], seed: int) -> None:
        """Training images after augmentation, de-normalized, and images per class per split. The
        samples are taken here; the PNGs are drawn in a thread while training starts (matplotlib's
        import and two figures cost about a second before the first step otherwise)."""
        if not self.active:
            return
        count = min(SAMPLE_IMAGES, len(train_ds))
        # Drawing augmented samples consumes random numbers; fork so training sees the same stream
        # whether or not the pictures were made.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            picks = torch.randperm(len(train_ds))[:count].tolist()
            samples = [train_ds[i] for i in picks]
        # uint8 as the workers deliver them: what the model sees before normalization on the device.
        images = torch.stack([s[0] for s in samples]).permute(0, 2, 3, 1).float().numpy() / 255.0
        captions = [self._caption(s[1]) for s in samples]

        def draw() -> None:
            from trainer.reporting import plots  # matplotlib: imported in this thread, not before the first step

            plots.class_distribution(self.run_dir / "class_distribution.png", self.class_names, split_counts)
            plots.image_grid(self.run_dir / "train_samples.png", images, captions,
                             title="training samples (after augmentation)")

        self._data_plots = _Drawing(draw)

    def _log_data_plots(self) -> None:
        """Wait for the data pictures (long drawn by the end of an epoch) and log them at epoch 0."""
        if self._data_plots is None:
            return
        drawing, self._data_plots = self._data_plots, None
        drawing.wait()
        self._log({"epoch": 0, "media/train_samples": self._image("train_samples.png"),
                   "media/class_distribution": self._image("class_distribution.png")})

    def _caption(self, label) -> str:
        """A class index, or a multi-hot vector (multi-label): every class it has."""
        if isinstance(label, torch.Tensor) and label.ndim == 1:
            return ", ".join(self.class_names[i] for i in label.nonzero().flatten().tolist())
        return self.class_names[label]

    # ---- training steps and epochs ----

    def continue_after(self, batches_done: int) -> None:
        """A resumed run: drop the train_steps.jsonl lines after `batches_done` (trained and logged
        again now) and a line a kill or a full disk cut short."""
        path = self.run_dir / "train_steps.jsonl"
        if self.active and trim_jsonl(path, "step", batches_done):
            print(f"note: dropped a damaged line from {path}", flush=True)

    def start_fresh(self) -> None:
        """A fresh start: train_steps.jsonl begins empty (a run killed before its first checkpoint,
        which restarts fresh, wrote steps this one would log again)."""
        if self.active:
            trim_jsonl(self.run_dir / "train_steps.jsonl", "step", 0)

    def train_step(self, epoch: int, global_step: int, epoch_progress: float, loss: float, lr: float,
                   global_batch_size: int) -> None:
        """Called every train.log_every_steps; `global_step` counts batches over the whole run (it
        continues after a resume), `loss` is the main process's batch loss."""
        if not self.active:
            return
        now = time.perf_counter()
        record = {"step": global_step, "epoch": epoch, "epoch_progress": epoch_progress, "loss": loss, "lr": lr}
        if self._mark is not None and self._mark[0] == epoch and global_step > self._mark[1]:
            # Measured between two logs of the same epoch, so validation time is not counted.
            record["images_per_sec"] = (global_step - self._mark[1]) * global_batch_size / (now - self._mark[2])
        self._mark = (epoch, global_step, now)
        path = self.run_dir / "train_steps.jsonl"
        try:
            append_line(path, json.dumps(record))
        except OSError as e:
            if not is_write_fault(e):
                raise
            raise write_failed(path, e, "the log and the checkpoints written so far are intact; {remedy} "
                                        "and continue with run.resume=auto") from None
        self._log({f"train_step/{k}": v for k, v in record.items()})

    def epoch(self, record: dict, history: list[dict], predictions: object | None) -> None:
        """Log one metrics.jsonl record (keys and values unchanged) and redraw the pictures from the
        run's whole `history` (every finished epoch, also those before a resume)."""
        if not self.active:
            return
        from trainer.reporting import plots  # (the drawing thread has usually imported it already)

        self._log_data_plots()
        plots.curves(self.run_dir / "curves.png", history, self._logged_steps())
        values: dict[str, Any] = {"epoch": record["epoch"]}
        values |= {f"epoch/{k}": v for k, v in record.items() if k != "epoch"}
        if isinstance(predictions, ValidationPredictions):  # (a multi-label pass has no confusion matrix)
            values |= self._validation_pictures(record, predictions)
        self._log(values)

    def _logged_steps(self) -> list[dict]:
        path = self.run_dir / "train_steps.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def _validation_pictures(self, record: dict, p: ValidationPredictions) -> dict[str, Any]:
        from trainer.reporting import plots

        epoch = record["epoch"]
        matrix = confusion_matrix(p.labels, p.predicted, len(self.class_names)).numpy()
        rows = per_class_accuracy(matrix, self.class_names)
        if record["is_best"]:  # the files describe the epoch best.safetensors holds
            plots.confusion_plot(self.run_dir / "confusion_matrix.png", matrix, self.class_names,
                                 f"confusion matrix, epoch {epoch} (validation; best.safetensors)")
            with atomic_output(self.run_dir / "per_class_accuracy.csv") as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["epoch", "class", "images", "correct", "accuracy"])
                writer.writeheader()
                writer.writerows({"epoch": epoch, **row} for row in rows)
        images = plots.denormalize(p.sample_images.float().numpy(), self.mean, self.std)
        titles = [f"Actual: {self.class_names[a]}\nPrediction: {self.class_names[b]}"
                  for a, b in zip(p.sample_labels, p.sample_predicted)]
        wrong = [a != b for a, b in zip(p.sample_labels, p.sample_predicted)]
        plots.image_grid(self.run_dir / "predictions.png", images, titles, wrong,
                         f"validation predictions, epoch {epoch} ({sum(wrong)} of {len(wrong)} wrong, framed in red)")
        if self.run is None:
            return {}
        import wandb

        table = wandb.Table(columns=["class", "images", "correct", "accuracy"],
                            data=[[r["class"], r["images"], r["correct"], r["accuracy"]] for r in rows])
        return {"media/predictions": self._image("predictions.png"),
                "media/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=p.labels.tolist(), preds=p.predicted.tolist(), class_names=self.class_names,
                    title=f"Confusion matrix, epoch {epoch}"),
                "media/confusion_matrix_image": self._image("confusion_matrix.png"),
                "media/per_class_accuracy": table}

    # ---- the end ----

    def mistakes(self, predictions, val_images, best: dict | None) -> tuple[list[Path], list[str]]:
        """What went wrong in the best epoch's validation pass (trainer/reporting/mistakes.py):
        top_losses.png / .csv, most_confused.csv and label_issues.csv in the run folder, logged as
        W&B media and tables. `predictions`: that pass's (gathered from every process, in the order
        of `val_images`, the validation dataset), None when it ran before a resume. Returns the
        files written and lines to print (how many likely label errors, what could not be judged)."""
        if not self.active or best is None:
            return [], []
        if predictions is None:  # a resumed run whose best epoch came before the resume: its predictions are gone
            if (self.run_dir / "label_issues.csv").is_file():  # written when that run ended
                return [self.run_dir / name for name in MISTAKE_FILES if (self.run_dir / name).is_file()], []
            return [], [f"note: the best epoch ({best['epoch']}) ran before the resume; for its top losses and label "
                        "issues run launch/evaluate.py --checkpoint RUN/best.safetensors --split val"]
        paths = [str(path) for path, _ in val_images.samples]
        if len(paths) != len(predictions.probs):  # never pair an image with another image's predictions
            return [], [f"warning: {len(predictions.probs)} validation predictions for {len(paths)} images; top "
                        "losses and label issues left out"]
        evaluated = Evaluated(paths, predictions.labels, predictions.probs, self.class_names,
                              getattr(predictions, "thresholds", None))  # multi-label: where each class is called
        found = find_mistakes(evaluated)
        # The images as validation saw them (its eval transform), before normalization.
        written = write_mistakes(self.run_dir, found, lambda i: val_images[i][0].permute(1, 2, 0).numpy())
        if self.run is not None:
            import wandb

            values = {"epoch": best["epoch"], "media/top_losses": self._image("top_losses.png")}
            for key, name, rows in (("top_losses_table", "top_losses.csv", found.top_losses),
                                    ("most_confused", "most_confused.csv", found.most_confused),
                                    ("label_issues", "label_issues.csv", found.label_issues)):
                columns = found.columns[name]
                values[f"media/{key}"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self._log(values)
        judged = ([f"{len(found.label_issues)} likely label errors among the validation images (cleanlab): "
                   f"{self.run_dir / 'label_issues.csv'}"] if found.labels_judged else [])
        return written, [*(f"note: {note}" for note in found.notes), *judged]

    def finish(self, best_path: Path) -> list[Path]:
        """Log the best checkpoint as a W&B artifact when wandb.log_model asks; list local files."""
        if not self.active:
            return []
        self._log_data_plots()
        if self.run is not None and self.log_model and best_path.is_file():
            self._log_checkpoint(best_path)
        names = ["curves.png", "confusion_matrix.png", "predictions.png", "train_samples.png",
                 "class_distribution.png", "per_class_accuracy.csv", "train_steps.jsonl"]
        return [self.run_dir / name for name in names if (self.run_dir / name).is_file()]

    def _log_checkpoint(self, path: Path) -> None:
        import wandb

        from trainer.files.model_file import read_metadata

        meta = read_metadata(path)
        artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=meta,
                                  description=f"{meta['model_name']}, best epoch {meta['epoch']}")
        artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact, aliases=["best", f"epoch-{meta['epoch']}"])

    def _image(self, name: str):
        if self.run is None:
            return None
        import wandb

        return wandb.Image(str(self.run_dir / name))

    def _log(self, values: dict) -> None:
        if self.run is not None:
            self.accelerator.log(values)
