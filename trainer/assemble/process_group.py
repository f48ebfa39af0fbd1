"""The process group's faults: how long a process waits for the others (runtime.ddp_timeout), and
the one line a process ends with when another stopped answering or died.

torch waits 30 minutes at a collective over gloo (10 over NCCL) and then raises an error naming a
source file of gloo; a rank that died makes the others raise "Connection closed by peer". Neither
says which rank, nor what to do. Once the group is up, every process learns every other's host and
pid (`record_peers`, one all-gather); when a collective fails, `peer_fault` looks at the processes
on this host (/proc: stopped, in uninterruptible sleep such as a hung file system, or gone) and
writes the line: what was waited for (the innermost frame of this project in the traceback), which
rank and pid, and what to do.

With NCCL, torch's watchdog may end a process at the timeout before Python sees an error; its own
log lines then say so.

Where the main process works alone by design (the first audit of a large dataset, filling the
feature cache) the others wait with `main_process_first` / `wait_for_the_main_process`, in a gloo
group of its own whose timeout is SOLO_WORK_TIMEOUT: hours of legitimate work are not a stuck peer.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

ROOT = Path(__file__).resolve().parents[2]  # frames under here are this project's
_TIMED_OUT = ("timed out", "timeout")
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
# /proc/PID/stat states of a process that cannot answer
_STUCK_STATES = {"T": "stopped (SIGSTOP, Ctrl-Z or a debugger)", "t": "stopped by a debugger",
                 "D": "blocked in the kernel (uninterruptible sleep: a hung file system or device)"}


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int


SOLO_WORK_TIMEOUT = datetime.timedelta(hours=4)

_peers: list[Peer] = []
_timeout_s: float = 0.0
_solo_group = None  # the group the others wait in while the main process works alone


def group_kwargs(timeout_s: float) -> InitProcessGroupKwargs:
    """Accelerate's process-group settings with runtime.ddp_timeout."""
    global _timeout_s
    _timeout_s = timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    # Accelerate passes only values that differ from its defaults (600 s, meant for NCCL), so
    # exactly 600 s would leave gloo at torch's 30 minutes: a microsecond more is passed.
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += datetime.timedelta(microseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


def record_peers(accelerator: Accelerator) -> None:
    """Every process's rank, host and pid, known to every process (a collective: all ranks call it)."""
    global _peers, _solo_group
    if accelerator.num_processes == 1:
        _peers, _solo_group = [], None
        return
    me = (accelerator.process_index, socket.gethostname(), os.getpid())
    _peers = [Peer(*facts) for facts in gather_object([me])]
    _solo_group = dist.new_group(backend="gloo", timeout=max(SOLO_WORK_TIMEOUT,
                                                             datetime.timedelta(seconds=_timeout_s)))


def wait_for_the_main_process(accelerator: Accelerator) -> None:
    """`accelerator.wait_for_everyone()` where the main process works alone: the others wait up
    to SOLO_WORK_TIMEOUT, not runtime.ddp_timeout."""
    if _solo_group is None or accelerator.num_processes == 1:
        accelerator.wait_for_everyone()
        return
    dist.barrier(group=_solo_group)


@contextmanager
def main_process_first(accelerator: Accelerator) -> Iterator[None]:
    """`accelerator.main_process_first()`, the others waiting with `wait_for_the_main_process`."""
    if not accelerator.is_main_process:
        wait_for_the_main_process(accelerator)
    yield
    if accelerator.is_main_process:
        wait_for_the_main_process(accelerator)


def process_state(pid: int) -> str | None:
    """The state letter of a process on this host (R, S, T, D, Z...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def peer_fault(error: BaseException, peers: list[Peer] | None = None, timeout_s: float | None = None) -> str | None:
    """The one line for a collective that failed because another process stopped answering or
    died; None when `error` is not that (it then keeps its traceback)."""
    peers = _peers if peers is None else peers
    timeout_s = _timeout_s if timeout_s is None else timeout_s
    if not isinstance(error, RuntimeError):  # torch.distributed's errors are RuntimeErrors
        return None
    text = str(error).lower()
    timed_out, gone = any(w in text for w in _TIMED_OUT), any(w in text for w in _PEER_GONE)
    said = re.search(r"timed out waiting (\d+)ms", text)  # gloo's own figure: right for every group
    waited_s = int(said.group(1)) / 1000 if said else timeout_s
    if not peers or not (timed_out or gone):
        return None
    host, me = socket.gethostname(), os.getpid()
    own = next((p.rank for p in peers if p.host == host and p.pid == me), None)
    others = [p for p in peers if p.rank != own]
    local = [p for p in others if p.host == host]
    remote = sorted({p.host for p in others if p.host != host})
    where = waited_at(error)
    dead = [p for p in local if process_state(p.pid) in (None, "Z")]
    stuck = [(p, _STUCK_STATES[s]) for p in local if (s := process_state(p.pid)) in _STUCK_STATES]
    start = f"rank {own} " if own is not None else ""
    if dead:
        names = ", ".join(f"rank {p.rank} (pid {p.pid})" for p in dead)
        return (f"{start}lost {names}: it ended while the others waited for it{where}; its own output or the "
                "launcher's says why (killed by the OOM killer, a signal, an error). The last complete checkpoint "
                "is kept: continue with run.resume=auto")
    if not timed_out:
        hosts = ", ".join(remote) or "this host"
        return (f"{start}lost its connection to another process{where}: one on {hosts} ended or its network "
                "failed; its own output or the launcher's says why. Continue with run.resume=auto")
    waited = f"waited {waited_s:g} s for the other processes{where}"
    if stuck:
        p, why = stuck[0]
        return (f"{start}{waited}, and rank {p.rank} (pid {p.pid}, this host) is {why}: resume it (kill -CONT "
                f"{p.pid}) or end the run and continue with run.resume=auto. A rank that is only slow needs a "
                f"longer runtime.ddp_timeout (now {timeout_s:g} s)")
    elsewhere = f"; check the ranks on {', '.join(remote)}" if remote else ""
    return (f"{start}{waited}; no process on this host is stopped or gone{elsewhere}. If a process is only slow "
            f"(torch.compile's first steps of a large model, a checkpoint written to a slow disk), raise "
            f"runtime.ddp_timeout (now {timeout_s:g} s); then continue with run.resume=auto")


def speaks_for_the_group(peers: list[Peer] | None = None) -> bool:
    """Whether this process prints the line: the lowest rank still answering on this host, unless a
    lower rank runs on another host (that one prints)."""
    peers = _peers if peers is None else peers
    host, me = socket.gethostname(), os.getpid()
    own = next((p.rank for p in peers if p.host == host and p.pid == me), 0)
    for p in peers:
        if p.rank < own and (p.host != host or process_state(p.pid) not in (None, "Z", *_STUCK_STATES)):
            return False
    return True


def waited_at(error: BaseException) -> str:
    """' at trainer/fit/step.py:93 (train_step)': where in this project the failed collective was called."""
    ours = [frame for frame in traceback.extract_tb(error.__traceback__)
            if Path(frame.filename).resolve().is_relative_to(ROOT)
            and not any(part in frame.filename for part in ("/launch/", "site-packages"))]
    if not ours:
        return ""
    frame = ours[-1]
    return f" at {Path(frame.filename).resolve().relative_to(ROOT)}:{frame.lineno} ({frame.name})"
