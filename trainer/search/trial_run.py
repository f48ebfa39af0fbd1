"""One trial as a real run: `launch/train.py` (or `accelerate launch ... launch/train.py`) as a child
process with the trial's parameters as overrides and its own run.dir; followed through the
metrics.jsonl lines the run writes (one per epoch, flushed), each reported to Optuna's pruner; a
pruned trial is stopped by SIGTERM to its training processes (the run, or each rank), the run's own
clean stop (checkpoint, exit 75), so it can be resumed or extended later.

Every rank of a multi-process trial gets the same parameters: they are on its command line.
The child runs in its own session (a Ctrl-C at the driver's terminal is the driver's to handle)
and asks the kernel for SIGTERM when the driver dies, so a killed driver's trial still stops
cleanly at its next step. (A multi-process trial's launcher gets that SIGTERM, and torch elastic
passes it to each rank's whole process group: ranks with DataLoader workers then fail instead, and
the retry resumes from the checkpoint before.)
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from trainer.search.space import SearchSpace, override_text

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
EXIT_PREEMPTED = 75  # trainer/fit/signals.py (not imported: it imports torch)
POLL_S = 0.5


@dataclass
class TrialLaunch:
    """How every trial of this driver is started: the config, the user's overrides, and the
    `accelerate launch` arguments (empty: plain `python launch/train.py`)."""

    config: str | None
    overrides: list[str]
    launch_args: list[str] = field(default_factory=list)
    wandb_group: str = ""  # the study's name, else "" (the user's overrides name a group of their own)

    def command(self, params: dict, run_dir: Path, resume: bool) -> list[str]:
        args = [*(["--config", self.config] if self.config else []), *self.overrides,
                *(override_text(k, v) for k, v in params.items()), f"run.dir={run_dir}",
                *(["run.resume=auto"] if resume else [])]
        args += [*([f"wandb.group={self.wandb_group}"] if self.wandb_group else []), f"wandb.name={run_dir.name}"]
        if not self.launch_args:
            return [sys.executable, str(TRAIN_SCRIPT), *args]
        return [accelerate_executable(), "launch", *self._with_port(), str(TRAIN_SCRIPT), *args]

    def _with_port(self) -> list[str]:
        # Two drivers on one machine would meet on accelerate's default rendezvous port.
        if any(a.startswith("--main_process_port") for a in self.launch_args):
            return list(self.launch_args)
        return [*self.launch_args, "--main_process_port", str(free_port())]


def parse_launch(text: str) -> list[str]:
    """--launch's text: accelerate's own arguments (a leading `accelerate launch` is dropped)."""
    args = shlex.split(text)
    return args[2:] if args[:2] == ["accelerate", "launch"] else args


def accelerate_executable() -> str:
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.exists() else "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    """How a trial ended: complete, pruned or failed (with its one-line reason), its value and epochs."""

    state: str
    value: float | None
    epochs: int
    reason: str = ""


class MetricsTail:
    """The records of a metrics.jsonl another process is appending to, each complete line once."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a killed run cut short (the run drops it when it resumes)
        return records


class EpochReports:
    """Each epoch's metric to the trial (once, also after a resume re-reads old lines), and the
    pruner's verdict."""

    def __init__(self, trial, metric: str, already: dict[int, float]):
        self.trial, self.metric = trial, metric
        self.values: dict[int, float] = dict(already)

    def add(self, record: dict) -> bool:
        """Report one metrics.jsonl record; whether the pruner stops the trial now."""
        epoch, value = record.get("epoch"), record.get(self.metric)
        if not isinstance(epoch, int) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if epoch not in self.values:
            self.trial.report(float(value), epoch)
        self.values[epoch] = float(value)
        return self.trial.should_prune()

    def best(self, higher_is_better: bool) -> float | None:
        if not self.values:
            return None
        return (max if higher_is_better else min)(self.values.values())


def run_trial(trial, reports: EpochReports, command: list[str], run_dir: Path, log_path: Path,
              heartbeat) -> tuple[int, bool]:
    """Start the trial's run, follow its epochs until it ends; (exit code, pruned). `heartbeat()`
    is called every poll (it rate-limits itself)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    wait_until_free(run_dir)
    tail = MetricsTail(run_dir / "metrics.jsonl")
    pruned, launcher = False, is_launcher(command)
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=_term_with_parent)
        try:
            while True:
                code = child.poll()
                for record in tail.new_records():
                    if reports.add(record) and not pruned and not _last_epoch(run_dir, record):
                        pruned = True
                        stop(child, launcher)
                if code is not None:
                    return code, pruned
                heartbeat()
                time.sleep(POLL_S)
        except BaseException:
            stop(child, launcher)  # the driver is stopping (Ctrl-C, SIGTERM): the trial stops cleanly first
            child.wait()
            raise


def wait_until_free(run_dir: Path, timeout: float = 120.0) -> None:
    """A retry may start while the interrupted run (stopped by SIGTERM when its driver died) is
    still writing its checkpoint: wait until no process holds the folder's run lock (flock;
    trainer/files/run_lock.py), so the retry resumes from that checkpoint instead of being refused."""
    import fcntl

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(run_dir / ".lock", os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody holds the folder
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return  # free (a killed run's file is left behind, unheld)
        except BlockingIOError:
            time.sleep(POLL_S)
        except OSError:
            return  # no flock on this file system: the run's own lock check decides
        finally:
            os.close(fd)


def stop(child: subprocess.Popen, launcher: bool) -> None:
    """SIGTERM to the processes that train, and to nothing else: the run itself, or the ranks (the
    launcher's children). A DataLoader worker that gets SIGTERM from anyone but its parent dies and
    takes its run's clean stop with it ("DataLoader worker is killed by signal"), and so does
    SIGTERM to `accelerate launch`: torch elastic passes it on to each rank's whole process group,
    workers included. Left alone, the launcher ends when its ranks have (after their checkpoint)."""
    ranks = children_of(child.pid) if launcher else []
    for pid in ranks or [child.pid]:  # a launcher with no ranks yet has nothing to save: it stops itself
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def is_launcher(command: list[str]) -> bool:
    """Whether TrialLaunch.command started `accelerate launch` (else the run itself)."""
    return command[1:2] == ["launch"]


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; elsewhere none, so the caller signals `pid`)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended while we looked
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:  # the field after the state: the parent
            children.append(int(stat.parent.name))
    return children


def _term_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a killed driver's trial runs to its end


def _last_epoch(run_dir: Path, record: dict) -> bool:
    """Whether `record` is the run's last epoch (stopping it then would cut its finish short)."""
    try:
        epochs = tomllib.loads((run_dir / "config.toml").read_text())["train"]["epochs"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return False
    return record.get("epoch", 0) >= epochs


def epochs_run(run_dir: Path) -> int:
    return len(MetricsTail(run_dir / "metrics.jsonl").new_records())


def outcome_of(code: int, pruned: bool, reports: EpochReports, higher_is_better: bool, run_dir: Path,
               log_path: Path) -> Outcome:
    epochs = epochs_run(run_dir)
    best = reports.best(higher_is_better)
    if pruned:
        return Outcome("pruned", best, epochs)
    if code == 0 and best is not None:
        return Outcome("complete", best, epochs)
    if code == 0:
        return Outcome("failed", None, epochs, f"the run wrote no {reports.metric} to {run_dir / 'metrics.jsonl'}")
    return Outcome("failed", best, epochs, failure_line(code, log_path))


def failure_line(code: int, log_path: Path) -> str:
    """The run's own `error:` line, else its last line, else how it ended."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code == EXIT_PREEMPTED:
        return "stopped by a signal (exit 75); a retry resumes it"
    last = lines[-1] if lines else ""
    return f"exit code {code}" + (f": {last[:200]}" if last else "")
