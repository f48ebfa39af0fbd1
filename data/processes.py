"""Facts about processes on this host, read from the kernel: whether a pid runs, when it started
(a reused pid has another start time) and its command line. The run lock, the removal of killed
writers' leftovers and the search's check for dead drivers all ask these; nothing here imports torch."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


def pid_runs(pid: int) -> bool:
    """Whether `pid` is a process on this host (another user's counts: it runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a reused pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def same_process_runs(pid: int, started: int | None) -> bool:
    """Whether the process recorded as (`pid`, `started`) still runs: the pid runs and, where both
    start times are known, it is the one that started then (not a reuse of its number)."""
    if not pid_runs(pid):
        return False
    return started is None or process_start(pid) in (None, started)


def command_of(pid: int) -> str | None:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    return shlex.join(p.decode(errors="replace") for p in parts)
