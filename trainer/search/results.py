"""What a search leaves for people: the live table, DIR/trials.csv, DIR/best.toml and the pictures.

All of it is read from the study (its storage), so whichever driver finishes last writes the
whole study's files, and running `launch/search.py ... --trials 0` rewrites them.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tomllib
import warnings
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from configs.schema import dump_toml
from trainer.search.study import REASON, counted, first_number

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


def atomic_write_text(path: Path, text: str) -> Path:
    """Replace `path` whole: several drivers may write the study's files at the same moment.
    (data.files has the same, but importing the data package imports torch.)"""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def run_folder(out_dir: Path, trial: FrozenTrial) -> Path:
    """A trial's run folder; a retry continues in the folder of the trial it retries."""
    return out_dir / f"trial-{first_number(trial):04d}"


def trial_row(trial: FrozenTrial, keys: list[str], out_dir: Path) -> dict:
    """One trials.csv row: number, state, value, epochs, each parameter, run folder, reason."""
    value = trial.value if trial.value is not None else _last_value(trial)
    return {"number": trial.number, "state": STATES.get(trial.state, trial.state.name.lower()),
            "value": "" if value is None else f"{value:.6g}", "epochs": trial.user_attrs.get("epochs", ""),
            **{k: trial.params.get(k, "") for k in keys}, "run_dir": str(run_folder(out_dir, trial)),
            "reason": trial.user_attrs.get(REASON, "") if trial.state == TrialState.FAIL else ""}


def _last_value(trial: FrozenTrial) -> float | None:
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def write_trials_csv(path: Path, trials: list[FrozenTrial], keys: list[str], out_dir: Path) -> Path:
    rows = [trial_row(t, keys, out_dir) for t in counted(trials)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["number", "state", "value", "epochs", *keys, "run_dir", "reason"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def write_best_config(path: Path, best: FrozenTrial, out_dir: Path, metric: str) -> Path:
    """The best trial's resolved config.toml, with a run folder of its own: training from it gives
    the trial's result again (same config, same seed) without touching the trial's folder. For a
    retry, the folder's config.toml is the resumed run's: what the retry adds (run.resume) is reset."""
    source = run_folder(out_dir, best) / "config.toml"
    tables = tomllib.loads(source.read_text(encoding="utf-8"))
    tables["run"].update({"dir": str(out_dir / "best"), "resume": ""})
    if "wandb" in tables:
        tables["wandb"]["name"] = ""
    continued = first_number(best)
    retry = f" (continuing trial {continued} in its folder)" if continued != best.number else ""
    header = (f"# The best trial of the search in {out_dir}: trial {best.number}{retry}, {metric} {best.value:.6g}\n"
              f"# (resolved config of {source}; run.dir changed so a new run does not touch the trial's folder)\n"
              f"#   python launch/train.py --config {path}\n")
    return atomic_write_text(path, header + dump_toml(tables))


class LiveTable:
    """One line per finished trial (this driver's), with the study's best so far."""

    def __init__(self, keys: list[str], metric: str):
        self.keys, self.metric = keys, metric
        self._header_printed = False

    def header(self) -> str:
        return "  ".join([f"{'trial':>5}", f"{'state':<8}", f"{self.metric:>9}", f"{'epochs':>6}",
                          *(f"{k:>14}" for k in self.keys), f"{'best':>9}"])

    def row(self, trial: FrozenTrial, best: float | None) -> str:
        value = trial.value if trial.value is not None else _last_value(trial)
        line = "  ".join([f"{trial.number:>5}", f"{STATES.get(trial.state, '?'):<8}", _number(value, 9),
                          f"{trial.user_attrs.get('epochs', ''):>6}",
                          *(_param(trial.params.get(k), 14) for k in self.keys), _number(best, 9)])
        reason = trial.user_attrs.get(REASON, "") if trial.state == TrialState.FAIL else ""
        return line + (f"  {reason}" if reason else "")

    def show(self, trial: FrozenTrial, best: float | None) -> None:
        if not self._header_printed:
            print(self.header(), flush=True)
            self._header_printed = True
        print(self.row(trial, best), flush=True)


def _number(value: float | None, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, float) and math.isfinite(value) else " " * (width - 1) + "-"


def _param(value, width: int) -> str:
    if isinstance(value, float):
        return f"{value:>{width}.3g}"
    return f"{str(value):>{width}}"


def write_plots(study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Optuna's pictures of the study as PNG files; (written, notes on those that could not be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written, notes = [], []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                axes = getattr(optuna_plots, f"plot_{name}")(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(9, 6)
            figure.tight_layout()
            path = out_dir / f"{name}.png"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
            figure.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, path)
            plt.close(figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few finished trials to draw it
            notes.append(f"{name}.png not drawn: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return written, notes
