"""One run per run folder: a lock file held for the life of a run, by its main process.

`run.dir/.lock` is created with O_CREAT | O_EXCL (atomic on local file systems and on NFSv3+),
holding JSON {host, pid, started}. A second run on the folder stops at once with one line naming
the holder. A lock whose process is gone (same host, pid not running) is stale: it is taken over
by renaming it aside first, so two runs that both find it stale cannot both win. A lock from
another host is never judged stale (its pid means nothing here): the line says how to remove it.

DDP ranks under `accelerate launch` ask the kernel to kill them when their launcher dies
(PR_SET_PDEATHSIG), so a killed launcher leaves no orphans writing to the folder; their lock is
then stale and the next run takes it over.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from configs.errors import UsageError

LOCK_NAME = ".lock"
MIN_FREE_BYTES = 200 * 2**20  # a few checkpoints of a small model; far less means the run dies mid-write


class RunLock:
    """`with RunLock(run_dir, accelerator):` the whole run. Every process enters; the main process
    holds the file, and every process raises the same UsageError when it cannot."""

    def __init__(self, run_dir: Path, accelerator: Accelerator):
        self.run_dir, self.accelerator = run_dir, accelerator
        self.path = run_dir / LOCK_NAME
        self.created_dir = False
        self.held = False

    def __enter__(self) -> "RunLock":
        die_with_launcher()
        error = None
        if self.accelerator.is_main_process:
            try:
                self._acquire()
            except UsageError as e:
                error = str(e)
        if self.accelerator.num_processes > 1:  # every rank learns the main process's answer
            error = broadcast_object_list([error])[0]
        if error:
            raise UsageError(error)
        return self

    def __exit__(self, *exc) -> None:
        if not self.held:
            return
        self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_dir and exc[0] is not None:
            try:
                self.run_dir.rmdir()  # a run that failed before writing anything leaves no folder
            except OSError:
                pass

    def _acquire(self) -> None:
        check_run_dir(self.run_dir)
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return
        raise UsageError(f"could not take the lock {self.path}: another run keeps taking it")

    def _take_over_if_stale(self) -> None:
        holder = read_holder(self.path)
        if holder is None:
            return  # released between our two looks: try again
        if holder.get("host") != socket.gethostname() or _alive(holder.get("pid")):
            raise UsageError(
                f"{self.run_dir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                f"started {holder.get('started')}): choose another run.dir, or wait for that run to end"
                + ("" if holder.get("host") == socket.gethostname() else
                   f" (if it is gone, delete {self.path})"))
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)  # only one of several runs finding it stale gets to move it
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)


def check_run_dir(run_dir: Path) -> None:
    """run.dir must be a folder (or creatable as one), writable, with room for checkpoints."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"run.dir={run_dir}: {existing} is a file, not a folder; choose another run.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"run.dir={run_dir}: {existing} is not writable; choose another run.dir or fix its permissions")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UsageError(f"run.dir={run_dir}: only {free / 2**20:.0f} MiB free on its disk (at least "
                         f"{MIN_FREE_BYTES / 2**20:.0f} MiB needed for checkpoints); free space or choose another run.dir")


def read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held by an unknown process


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # an unreadable lock is never judged stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parent_is_accelerate_launch() -> bool:
    try:
        command = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"accelerate") for part in command) and b"launch" in command


def die_with_launcher() -> None:
    """Under `accelerate launch` (torchrun's ranks, or its one-process child), have the kernel kill
    this process when its launcher dies: orphans would keep writing to a folder a new run then shares."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and not _parent_is_accelerate_launch():
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux: no parent-death signal
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGKILL)
