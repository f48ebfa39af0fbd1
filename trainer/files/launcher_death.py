"""Processes started by `accelerate launch` or `torchrun` die with their launcher.

torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (a job
scheduler, the OOM killer, `kill -9`) takes no rank with it: the ranks would live on under PID 1,
hundreds of MB each, blocked at the rendezvous for torch's 30 minutes and then retrying, or
writing into a run folder a new run then shares. A rank asks the kernel for SIGKILL when its
launcher ends (PR_SET_PDEATHSIG) as the entry script's first act, before torch is imported and
long before the process group is up.

The request only covers a launcher alive when it is made. The launcher may die between starting a
rank and the rank's request (the interpreter's start-up): the entry script reads its parent's pid
as its first instruction, and after the request the rank checks that its parent is still that
process and still a launcher. Otherwise it ends at once, in one line.

Imports nothing heavy: `launch/train.py` calls it before torch and Accelerate are loaded.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

from configs.errors import TrainingFailed

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LAUNCHER_SCRIPTS = (b"accelerate", b"torchrun")
_LAUNCHER_MODULES = (b"torch.distributed.run", b"torch.distributed.launch")

_armed = False


def _command(pid: int) -> list[bytes]:
    try:
        return [part for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if part]
    except OSError:
        return []


def is_launcher_command(command: list[bytes]) -> bool:
    """`accelerate launch`, `torchrun`, `python -m torch.distributed.run`: a process that starts ranks."""
    names = [os.path.basename(part) for part in command]
    if any(name in _LAUNCHER_SCRIPTS for name in names) or any(part in _LAUNCHER_MODULES for part in command):
        return True
    # torch's elastic agent is Python whoever embeds it; what adopts an orphan (init, tini, systemd,
    # a shell) is not.
    return "TORCHELASTIC_RUN_ID" in os.environ and bool(names) and names[0].startswith(b"python")


def _launched() -> bool:
    """A rank of torchrun (what `accelerate launch --multi_gpu` runs), or the one process that
    `accelerate launch` starts (no torchrun then: its parent says so)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or is_launcher_command(_command(os.getppid()))


def die_with_launcher(first_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its launcher dies; a no-op when no launcher
    started it, off Linux, and after the first call. `first_parent`: os.getppid() as the entry
    script's first instruction read it. Raises TrainingFailed when the launcher already ended."""
    global _armed
    if _armed:
        return
    parent = os.getppid() if first_parent is None else first_parent
    if first_parent is not None and "TORCHELASTIC_RUN_ID" not in os.environ:
        launched = is_launcher_command(_command(first_parent))
    else:
        launched = _launched()
    if not launched:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux: no parent-death signal
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    _armed = True
    # Asked too late when the launcher had already ended: this process was adopted by another
    # (a new parent pid), or was adopted before its first instruction (a parent that is no launcher).
    if os.getppid() != parent or not is_launcher_command(_command(parent)):
        raise TrainingFailed(f"the launcher (pid {parent}) ended while this process (pid {os.getpid()}) was "
                             "starting; stopping before anything is written")
