"""One run per run folder, and a run folder that is the run's: checked and locked by the main
process before anything is written.

The folder. A run writes only into a folder that is new, empty, or a run folder of this project:
one holding the marker `.imgtrain-run` (written when a run starts in it), or, for folders of older
versions, config.toml with checkpoints/ or metrics.jsonl. Anything else (a project folder, the
home folder, `/`, the dataset) is refused with one line before a byte is written, as is a run.dir
inside or equal to a folder the run reads (data.root) or the folder of a file it reads (a CSV).

The lock. `run.dir/.lock` is held with `fcntl.flock` by the main process for the run's life. The
kernel releases it when the process ends, however it ends, so a killed run leaves nothing to take
over and no two runs can both hold it (a takeover by renaming a stale file aside could be done by
two runs at once: each then believed it held the lock). The file holds the holder's facts (host,
pid, start time, command) for people: a refused run names them. A run ending removes the file
while still holding it; a run that locked the removed file sees it is no longer the file at that
name and tries again.

File systems without flock (some FUSE and SMB mounts answer ENOLCK or EOPNOTSUPP): the lock is the
file's existence (O_EXCL). A lock whose process is gone (same host; pid not running, or running
with another start time: a pid reused after a container restart) or that stayed empty or
unreadable for a while (a kill between creating and writing it) is removed only by the holder of a
takeover file, and only if it is still the very file judged (inode, size and mtime): a run can
never remove a lock another run has just made. A lock from another host cannot be judged here: the
line says how to remove it.

DDP ranks under `accelerate launch` ask the kernel to kill them when their launcher dies
(trainer/files/launcher_death.py), so a killed launcher leaves no orphans writing to the folder:
`launch/train.py` asks first thing; the lock asks again for entry points that did not.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from configs.errors import UsageError
from data.files import atomic_write_json
from trainer.files.launcher_death import die_with_launcher

try:
    import fcntl
except ImportError:  # not POSIX: the exclusive-create lock
    fcntl = None

LOCK_NAME = ".lock"
TAKEOVER_NAME = ".lock.takeover"  # held for the moment a stale lock is removed (no-flock file systems)
MARKER_NAME = ".imgtrain-run"
MIN_FREE_BYTES = 200 * 2**20  # a few checkpoints of a small model; far less means the run dies mid-write
NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
WRITE_GRACE_S = 10.0  # an empty or unreadable lock younger than this may be a run writing it
TAKEOVER_STALE_S = 30.0  # a takeover file is held for microseconds: older, its holder was killed


class RunLock:
    """`with RunLock(run_dir, accelerator, reads=...):` the whole run. Every process enters; the main
    process checks the folder and holds the lock, and every process raises the same UsageError when
    it cannot. `reads`: the resolved paths the run reads its samples from (folders and files)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, reads: Sequence[Path] = ()):
        self.run_dir, self.accelerator, self.reads = run_dir, accelerator, tuple(reads)
        self.path = run_dir / LOCK_NAME
        self.created_dir = False
        self.fd: int | None = None
        self.flocked = False

    @property
    def held(self) -> bool:
        return self.fd is not None

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
        if self.flocked or _is_open_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)  # while still held: the next run locks a new file
        os.close(self.fd)
        self.fd = None
        if self.created_dir and exc[0] is not None:
            try:
                self.run_dir.rmdir()  # a run that failed before writing anything leaves no folder
            except OSError:
                pass

    def _acquire(self) -> None:
        check_run_folder(self.run_dir, self.reads)
        check_run_dir(self.run_dir)
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # each turn ends with the lock held, a refusal, or a stale lock removed
            fd, self.flocked = _open_and_lock(self.path)
            if fd is not None:
                self.fd = fd
                _write_holder(fd)
                return
            _remove_if_stale(self.path)
        raise UsageError(f"could not take the lock {self.path}: other runs keep taking it; start one run at a time")


# ---- the folder ----

def check_run_folder(run_dir: Path, reads: Sequence[Path] = ()) -> None:
    """Refuse a run.dir (resolved) that is not the run's to write into: see the module's docstring."""
    if run_dir.parent == run_dir:
        raise UsageError(f"run.dir={run_dir} is the root folder; give a folder of its own, e.g. run.dir=runs/first")
    if run_dir == _home():
        raise UsageError(f"run.dir={run_dir} is your home folder; give a folder of its own, e.g. run.dir=~/runs/first")
    for source in reads:
        if source.is_file():
            if run_dir == source.parent:
                raise UsageError(f"run.dir={run_dir} is the folder of {source.name}, which the run reads; choose a "
                             f"run.dir of its own, e.g. {run_dir / 'runs' / 'first'}")
        elif run_dir == source or source in run_dir.parents:
            raise UsageError(f"run.dir={run_dir} is {'' if run_dir == source else 'inside '}the data folder "
                             f"{source}: outputs would mix with the samples; choose a run.dir outside it")
    if not run_dir.is_dir() or is_run_folder(run_dir):
        return
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_NAME, TAKEOVER_NAME))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UsageError(f"run.dir={run_dir} holds files that are not a run's ({shown}): a run writes only into "
                         f"a new folder, an empty one or a run folder (one with {MARKER_NAME}); choose another "
                         f"run.dir, e.g. {run_dir / 'runs' / 'first'}")


def is_run_folder(folder: Path) -> bool:
    """A folder a run of this project made: its marker, or (older versions) its shape."""
    if (folder / MARKER_NAME).is_file():
        return True
    return (folder / "config.toml").is_file() and ((folder / "checkpoints").is_dir()
                                                   or (folder / "metrics.jsonl").is_file())


def mark_run_folder(run_dir: Path) -> None:
    """Write the marker that makes `run_dir` a run folder (once; the main process, before any output)."""
    marker = run_dir / MARKER_NAME
    if marker.is_file():
        return
    try:
        version = metadata.version("imgtrain")
    except metadata.PackageNotFoundError:
        version = "unknown"
    atomic_write_json(marker, {"project": "imgtrain", "version": version,
                               "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2)


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


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


# ---- the lock ----

def _open_and_lock(path: Path) -> tuple[int | None, bool]:
    """(fd, flocked): the lock file open and held, or (None, False) when a no-flock file system's
    lock exists (the caller judges it). Raises UsageError when a live run holds it."""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # released between our two looks
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(busy_message(path, read_holder(path))) from None
        except OSError as e:
            if e.errno not in NO_FLOCK:
                os.close(fd)
                raise
            if created:
                return fd, False  # no flock here: creating the file was taking the lock
            os.close(fd)
            return None, False
        if _is_open_file(fd, path):
            return fd, True
        os.close(fd)  # a run ending removed the file between our open and our lock: lock the new one


def _is_open_file(fd: int, path: Path) -> bool:
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _write_holder(fd: int) -> None:
    """The holder's facts, for people (and, without flock, for judging a lock stale)."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": command_of(os.getpid()) or shlex.join(sys.orig_argv),
              "pid_started": process_start(os.getpid())}
    os.ftruncate(fd, 0)  # a lock taken over from a killed run still holds its facts
    os.pwrite(fd, json.dumps(record).encode(), 0)


def read_holder(path: Path) -> dict | None:
    """The lock's facts; None when there is no lock, {} when it is empty or unreadable."""
    try:
        return parse_holder(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError:
        return {}


def parse_holder(content: bytes) -> dict:
    try:
        record = json.loads(content or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _names_holder(holder: dict | None) -> bool:
    """A lock whose facts were written whole (not empty, cut short or garbage)."""
    return bool(holder) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)


def busy_message(path: Path, holder: dict | None, advice: str = "") -> str:
    run_dir = path.parent
    if not _names_holder(holder):
        return (f"{run_dir} is in use by another run, which has not yet said who it is in {path}: choose another "
                f"run.dir, or wait for that run to end{advice}")
    return (f"{run_dir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started')}): choose another run.dir, or wait for that run to end{advice}")


def _remove_if_stale(path: Path) -> None:
    """No flock: remove the lock at `path` if its run is gone, else raise the line naming it."""
    try:
        seen, content = os.stat(path), path.read_bytes()
    except FileNotFoundError:
        return  # released: try again
    holder = parse_holder(content)
    if not _names_holder(holder):
        if time.time() - seen.st_mtime < WRITE_GRACE_S:
            raise UsageError(busy_message(path, holder))
    elif holder.get("host") != socket.gethostname():
        raise UsageError(busy_message(path, holder, f" (this file system has no flock, so a run on host "
                                                    f"{holder.get('host')} cannot be checked from here: if it is "
                                                    f"gone, delete {path})"))
    elif _running(holder):
        pid = holder["pid"]
        sure = holder.get("pid_started") is not None and process_start(pid) is not None
        raise UsageError(busy_message(path, holder, "" if sure else (
            f" (if `ps -p {pid} -o lstart,args` shows no run on this folder, pid {pid} was reused, as after a "
            f"container restart: delete {path})")))
    with _takeover_turn(path.with_name(TAKEOVER_NAME)):
        try:
            now, now_content = os.stat(path), path.read_bytes()
        except FileNotFoundError:
            return
        if (_identity(now), now_content) == (_identity(seen), content):  # the lock judged, not a new one
            path.unlink()


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _running(holder: dict) -> bool:
    """Whether the lock's process (on this host) still runs: its pid, started when the lock says."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # our own pid, yet we hold no lock: a pid reused after a restart
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("pid_started")
    return started is None or process_start(pid) in (None, started)


def command_of(pid: int) -> str | None:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    return shlex.join(p.decode(errors="replace") for p in parts)


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: a reused pid has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def _takeover_turn(path: Path) -> Iterator[None]:
    """One run at a time removes a stale lock: the holder of `path`, made with O_EXCL."""
    deadline = time.monotonic() + 10
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                if time.time() - os.stat(path).st_mtime > TAKEOVER_STALE_S:
                    path.unlink()  # its holder was killed in the moment it held it
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise UsageError(f"{path} has been held for seconds by another run; if no run is starting, "
                                 f"delete it") from None
            time.sleep(0.002)
    try:
        yield
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
