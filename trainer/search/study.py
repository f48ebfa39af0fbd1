"""The study several drivers share: its storage, its trial budget, and the trials of drivers that died.

Storage. Without --storage the study lives in DIR/study.journal (Optuna's JournalStorage on a file:
no server; `optuna-dashboard DIR/study.journal` opens it). A path names another journal file (on a
shared file system for drivers on several machines); a URL with `://` (sqlite:///..., postgresql://...)
is an Optuna RDB storage.

Budget. `--trials N` is the study's total over all its drivers. Trials are numbered by the storage
in the order they are created, so "the k-th fresh trial" is the same answer for every driver: a
fresh trial whose place among the fresh trials is N or later is surplus (two drivers asked at the
same moment) and is closed unrun. Retries of interrupted trials are not fresh: they take the place
of the trial they continue, so nothing is counted twice.

Dead drivers. A driver records on each trial it runs its host and pid, and a heartbeat time. A
running trial whose driver is gone (same host: the pid no longer runs; another host: no heartbeat
for `stale_after` seconds) is marked failed ("its driver stopped") and retried: a waiting copy with
the same parameters, which the next driver to ask takes and runs with run.resume=auto in the first
trial's run folder, so it continues from its newest checkpoint. Marking it failed is the claim:
the storage refuses the second of two drivers doing it at once, so one retry is made.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from configs.errors import UsageError
from trainer.search.space import SearchSpace

STUDY_FILE = "study.journal"
HEARTBEAT_EVERY_S = 20.0
# System attributes the driver keeps on a trial (the user attributes are for people: see results.py).
DRIVER = "imgtrain:driver"
HEARTBEAT = "imgtrain:heartbeat"
SURPLUS = "imgtrain:surplus"
REASON = "reason"  # a user attribute: why the trial failed, one line


def open_storage(out_dir: Path, url: str | None) -> optuna.storages.BaseStorage:
    if url and "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # sqlalchemy's errors: the URL, the driver, the server
            raise UsageError(f"--storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    path = Path(url).expanduser() if url else out_dir / STUDY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Optuna's default lock (a symlink; NFS too), the one optuna-dashboard takes on the same file.
    return optuna.storages.journal.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def load_or_create(storage, name: str, maximize: bool, sampler, pruner) -> optuna.Study:
    direction = "maximize" if maximize else "minimize"
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UsageError(f"study {name!r} already {study.direction.name.lower()}s; this search's metric "
                         f"would {direction} it: use another --out or --study name")
    return study


def make_sampler(seed: int | None):
    # constant_liar: trials other drivers are running count as poor guesses, so two drivers
    # asking at once are not sent to the same spot.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=4)


def make_pruner(space: SearchSpace, startup_trials: int):
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
    if space.pruner == "threshold":  # judges every trial from its first epoch, with no other trial needed
        side = "lower" if space.metric.higher_is_better else "upper"
        return optuna.pruners.ThresholdPruner(**{side: space.worse_than})
    return optuna.pruners.NopPruner()


# ---- the budget ----

# Where Optuna's retry callbacks record the first trial a retry continues (and the chain of
# retries): the same keys, so `RetryHeartbeatStaleTrialCallback.retried_trial_number` reads ours.
RETRIED, HISTORY = "failed_trial", "retry_history"


def is_retry(trial: FrozenTrial) -> bool:
    return trial.system_attrs.get(RETRIED) is not None


def first_number(trial: FrozenTrial) -> int:
    """The number of the trial a retry continues (its run folder's), else the trial's own."""
    retried = trial.system_attrs.get(RETRIED)
    return trial.number if retried is None else retried


def fresh_place(trials: list[FrozenTrial], number: int) -> int:
    """How many fresh (not retry) trials were created before trial `number`."""
    return sum(1 for t in trials if t.number < number and not is_retry(t))


def budget_left(trials: list[FrozenTrial], total: int) -> bool:
    """Whether there is work: a waiting retry, or fewer than `total` fresh trials made."""
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return sum(1 for t in trials if not is_retry(t)) < total


def is_surplus(trial: FrozenTrial, trials: list[FrozenTrial], total: int) -> bool:
    return not is_retry(trial) and fresh_place(trials, trial.number) >= total


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials a person reads about: without surplus ones closed unrun."""
    return [t for t in trials if not t.system_attrs.get(SURPLUS)]


# ---- drivers and their heartbeats ----

def driver_identity() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_started": process_start(pid)}


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a reused pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def driver_alive(trial: FrozenTrial, stale_after: float) -> bool:
    """Whether a running trial's driver still runs: asked of the kernel on this host, else judged by
    the trial's heartbeat (or, before its first, its start: a driver that has just asked for it
    has not yet written who it is)."""
    driver = trial.system_attrs.get(DRIVER)
    if driver and driver.get("host") == socket.gethostname():
        return _running(driver)
    beat = trial.system_attrs.get(HEARTBEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    return beat is not None and time.time() - beat < stale_after


def _running(driver: dict) -> bool:
    pid = driver.get("pid")
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return process_start(pid) in (None, driver.get("pid_started"))


def retry_orphans(study: optuna.Study, storage, stale_after: float) -> list[int]:
    """Fail and retry each running trial whose driver is gone; the numbers this driver retried."""
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if driver_alive(trial, stale_after):
            continue
        if interrupt(study, storage, trial, "its driver stopped"):
            retried.append(trial.number)
    return retried


def interrupt(study: optuna.Study, storage, trial: FrozenTrial, why: str) -> bool:
    """Mark a running trial failed and enqueue its retry (it resumes in the same run folder); False
    when the trial was already finished by someone else (another driver claimed it first)."""
    try:
        storage.set_trial_user_attr(trial._trial_id, REASON, f"{why}; continued by a retry in the same run folder")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    enqueue_retry(study, storage.get_trial(trial._trial_id))
    return True


def enqueue_retry(study: optuna.Study, failed: FrozenTrial) -> None:
    """A waiting copy of `failed`: its parameters and the epochs it reported (the pruner goes on
    from them), marked with the first trial's number (its run folder). What Optuna's retry
    callback does, without its deprecation and experimental warnings."""
    system_attrs = {RETRIED: first_number(failed), HISTORY: [*failed.system_attrs.get(HISTORY, []), failed.number]}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        user_attrs={k: v for k, v in failed.user_attrs.items() if k != REASON}, system_attrs=system_attrs,
        intermediate_values=failed.intermediate_values))
