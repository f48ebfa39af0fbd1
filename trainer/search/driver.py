"""The search driver, read top to bottom: check the space and config -> open the study -> retry
the trials of drivers that died -> ask, run, tell until the study has its N trials -> write the
results.

Several drivers (on one machine or several, sharing the study's storage) run this same loop; the
storage is the only thing they share, and the budget and the claim of dead drivers' trials are
decided through it (trainer/search/study.py). The driver imports no torch: it starts runs and
reads their files.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from configs.errors import ConfigError
from trainer.search import study as studies
from trainer.search.results import LiveTable, run_folder, write_best_config, write_plots, write_trials_csv
from trainer.search.space import SearchSpace, check_overrides, check_space, read_space
from trainer.search.trial_run import EXIT_PREEMPTED, EpochReports, TrialLaunch, outcome_of, run_trial


@dataclass
class SearchOptions:
    config: str | None
    space: str
    trials: int
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    storage: str | None = None
    study_name: str = ""
    launch_args: list[str] = field(default_factory=list)
    seed: int | None = None
    stale_after: float = 120.0  # seconds without a heartbeat before another host's trial counts as orphaned
    startup_trials: int = 3     # finished trials before the median pruner judges


class DriverStopped(Exception):
    """SIGTERM to the driver: stop the running trial cleanly, hand it to a retry, exit 75."""


@dataclass
class Search:
    """What the loop's steps share."""

    opts: SearchOptions
    space: SearchSpace
    study: optuna.Study
    storage: object
    launch: TrialLaunch
    table: LiveTable


def search(opts: SearchOptions) -> int:
    # ---- checks: everything that can fail on user input, before a file is written ----
    from trainer.assemble.run_config import load_config

    if opts.trials < 0:
        raise ConfigError(f"--trials must be 0 or more (the study's total; 0 rewrites its results), got {opts.trials}")
    check_overrides(opts.overrides)
    base = load_config(opts.config, opts.overrides)
    space = read_space(opts.space, base.data.task, base.train.best_metric)
    check_space(space, opts.config, opts.overrides)

    # ---- the study ----
    # Absolute once: trials.csv, best.toml and every trial's run.dir then work from any folder.
    opts = dataclasses.replace(opts, out_dir=opts.out_dir.expanduser().resolve())
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or opts.out_dir.name
    storage = studies.open_storage(opts.out_dir, opts.storage)
    pruner = studies.make_pruner(space, opts.startup_trials)
    study = studies.load_or_create(storage, name, space.metric.higher_is_better, studies.make_sampler(opts.seed),
                                   pruner)
    if opts.seed is not None:  # a restarted driver must not replay the draws of its first life
        study.sampler = studies.make_sampler(opts.seed + len(study.get_trials(deepcopy=False)))
    # Always, not only when wandb.mode says so: WANDB_MODE in the environment can turn W&B on too
    # (the run decides), and a group is inert on a run without W&B. A group the user set is theirs.
    group = "" if base.wandb.group else name
    run = Search(opts, space, study, storage, TrialLaunch(opts.config, opts.overrides, opts.launch_args, group),
                 LiveTable(space.keys, space.metric.key))
    print(f"study {name!r} in {opts.storage or opts.out_dir / studies.STUDY_FILE}: {space.metric.key} "
          f"({'higher' if space.metric.higher_is_better else 'lower'} is better), {opts.trials} trials in all, "
          f"pruner {space.pruner_text}", flush=True)
    for number in studies.retry_orphans(study, storage, opts.stale_after):
        print(f"trial {number}: its driver stopped; a retry resumes it from its checkpoint", flush=True)

    # ---- trials ----
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        while studies.budget_left(study.get_trials(deepcopy=False), opts.trials):
            if not run_next(run):
                break
    except (DriverStopped, KeyboardInterrupt):
        print("search stopped; run the same command to continue the study", flush=True)
        return EXIT_PREEMPTED
    finally:
        signal.signal(signal.SIGTERM, previous)

    # ---- results ----
    finish(run)
    return 0


def _raise_stopped(signum, frame) -> None:
    raise DriverStopped()


def run_next(run: Search) -> bool:
    """Ask for a trial, run it, tell its outcome; False when the trial was surplus (the budget is spent)."""
    study, storage = run.study, run.storage
    trial = study.ask()
    trials = study.get_trials(deepcopy=False)
    frozen = next(t for t in trials if t.number == trial.number)
    if studies.is_surplus(frozen, trials, run.opts.trials):
        storage.set_trial_system_attr(trial._trial_id, studies.SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return False
    storage.set_trial_system_attr(trial._trial_id, studies.DRIVER, studies.driver_identity())
    heartbeat = Heartbeat(storage, trial._trial_id)
    heartbeat()
    params = {p.key: p.suggest(trial) for p in run.space.params}
    resume = studies.is_retry(frozen)
    folder = run_folder(run.opts.out_dir, frozen)
    log_path = run.opts.out_dir / "logs" / f"{folder.name}.log"
    command = run.launch.command(params, folder, resume)
    reports = EpochReports(trial, run.space.metric.key, dict(frozen.intermediate_values))
    print(f"trial {trial.number}: {'resuming ' if resume else ''}{_params_text(params)} in {folder}", flush=True)
    try:
        code, pruned = run_trial(trial, reports, command, folder, log_path, heartbeat)
    except (DriverStopped, KeyboardInterrupt):
        studies.interrupt(study, storage, storage.get_trial(trial._trial_id), "the search was stopped")
        raise
    if code == EXIT_PREEMPTED and not pruned:  # stopped by someone else's SIGTERM (a cluster's preemption)
        studies.interrupt(study, storage, storage.get_trial(trial._trial_id), "its run was stopped by a signal")
        print(f"trial {trial.number}: its run was stopped by a signal; a retry resumes it", flush=True)
        return True
    outcome = outcome_of(code, pruned, reports, run.space.metric.higher_is_better, folder, log_path)
    storage.set_trial_user_attr(trial._trial_id, "epochs", outcome.epochs)
    if outcome.state == "failed":
        storage.set_trial_user_attr(trial._trial_id, studies.REASON, outcome.reason)
        study.tell(trial, state=TrialState.FAIL)
    elif outcome.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, outcome.value)
    run.table.show(storage.get_trial(trial._trial_id), _best_value(study))
    return True


class Heartbeat:
    """The trial's heartbeat in the storage, at most every HEARTBEAT_EVERY_S: drivers on other hosts
    judge by it whether this driver still runs."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id, self._last = storage, trial_id, 0.0

    def __call__(self) -> None:
        now = time.time()
        if now - self._last >= studies.HEARTBEAT_EVERY_S:
            self.storage.set_trial_system_attr(self.trial_id, studies.HEARTBEAT, now)
            self._last = now


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return None


def finish(run: Search) -> None:
    """trials.csv, best.toml and the pictures, from the whole study (all drivers' trials)."""
    out_dir, study = run.opts.out_dir, run.study
    trials = study.get_trials(deepcopy=False)
    written = [write_trials_csv(out_dir / "trials.csv", trials, run.space.keys, out_dir)]
    lines = [cost_line(trials)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        written.append(write_best_config(out_dir / "best.toml", best, out_dir, run.space.metric.key))
        lines.insert(0, f"best trial {best.number}: {run.space.metric.key} {best.value:.4f} "
                        f"({_params_text(best.params)}) in {run_folder(out_dir, best)}")
    else:
        lines.insert(0, "no trial completed: no best.toml (see the reasons in trials.csv)")
    plots, notes = write_plots(study, out_dir)
    written += plots
    print(*lines, *notes, *(f"wrote {p}" for p in written), sep="\n", flush=True)


def cost_line(trials) -> str:
    """Trials and their run time by state: what pruning saved."""
    parts = []
    for state, label in ((TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed")):
        done = [t for t in studies.counted(trials) if t.state == state and t.datetime_start and t.datetime_complete]
        if done:
            seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
            epochs = sum(int(t.user_attrs.get("epochs", 0) or 0) for t in done)
            parts.append(f"{len(done)} {label} ({seconds:.0f}s, {epochs} epochs, {seconds / len(done):.0f}s each)")
    return "trials: " + (", ".join(parts) if parts else "none finished")
