"""trainer/files/run_lock.py: one holder at most, however runs race for the lock; the locks a
killed run leaves (stale, empty, garbage, naming a reused pid) are taken, and a live run's is not.

The races run as real processes started together at a multiprocessing.Barrier, each round on a
lock a dead run left behind (the case where a takeover by renaming could make two holders)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import sys
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from configs.errors import UsageError
from data.processes import process_start
from trainer.files import run_lock
from trainer.files.run_lock import LOCK_NAME, RunLock

MAIN = SimpleNamespace(is_main_process=True, num_processes=1)  # what RunLock asks of the accelerator
ROUNDS, CONTENDERS = 300, 3


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leave_lock(run_dir: Path, pid: int, **extra) -> Path:
    """A lock as a run killed after writing it leaves: nobody holds it."""
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "2024-01-01 00:00:00",
                                **extra}))
    return path


def _contend(rounds: int, barrier, holders, run_dir: Path) -> None:
    for r in range(rounds):
        barrier.wait()  # the round's stale lock is in place: all contenders go at once
        try:
            with RunLock(run_dir, MAIN):
                with holders.get_lock():
                    holders[r] += 1
                barrier.wait()  # held until every contender has tried
        except UsageError:
            barrier.wait()
        barrier.wait()  # released


def _race(run_dir: Path, rounds: int = ROUNDS, contenders: int = CONTENDERS) -> list[int]:
    """Holders per round of `contenders` processes taking the lock a dead run left."""
    ctx = multiprocessing.get_context("fork")  # the contenders need this process's (patched) modules
    barrier = ctx.Barrier(contenders + 1, timeout=30)
    holders = ctx.Array("i", rounds)
    procs = [ctx.Process(target=_contend, args=(rounds, barrier, holders, run_dir)) for _ in range(contenders)]
    for p in procs:
        p.start()
    dead = _dead_pid()
    try:
        for _ in range(rounds):
            _leave_lock(run_dir, dead)
            for _ in range(3):
                barrier.wait()
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    return list(holders)


def _take_and_release(attempts: int, barrier, inside, most, run_dir: Path) -> None:
    barrier.wait()
    for _ in range(attempts):
        try:
            with RunLock(run_dir, MAIN):
                with inside.get_lock():
                    inside.value += 1
                    most.value = max(most.value, inside.value)
                time.sleep(0.0002)
                with inside.get_lock():
                    inside.value -= 1
        except UsageError:
            pass


def _no_flock(monkeypatch):
    """A file system without flock support (some FUSE and SMB mounts)."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(run_lock, "fcntl", SimpleNamespace(flock=refuse, LOCK_EX=2, LOCK_NB=4))


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_racing_runs_never_both_hold_the_lock(tmp_path, monkeypatch, flock):
    if not flock:
        _no_flock(monkeypatch)
    started = time.perf_counter()
    holders = _race(tmp_path)
    double = sum(h > 1 for h in holders)
    print(f"{'flock' if flock else 'no-flock'}: {ROUNDS} rounds of {CONTENDERS} contenders, "
          f"{double} with two holders, {holders.count(1)} with one, in {time.perf_counter() - started:.1f} s")
    assert double == 0
    assert holders.count(1) == ROUNDS  # and the lock a dead run left was always taken
    assert os.listdir(tmp_path) == []  # released, and no takeover file left behind


def test_runs_ending_while_others_start_never_overlap(tmp_path):
    """A run ends by removing the lock file while others open it: they must not lock the removed one."""
    ctx = multiprocessing.get_context("fork")
    barrier, inside, most = ctx.Barrier(CONTENDERS), ctx.Value("i", 0), ctx.Value("i", 0)
    procs = [ctx.Process(target=_take_and_release, args=(400, barrier, inside, most, tmp_path))
             for _ in range(CONTENDERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs) and most.value == 1


def test_a_live_runs_lock_is_refused_naming_it_and_released_at_the_end(tmp_path):
    with RunLock(tmp_path, MAIN):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"].startswith(sys.executable)  # this process's command line (pytest, or its xdist worker)
        with pytest.raises(UsageError, match=rf"in use by another run \(host {holder['host']}, pid {os.getpid()}, "
                                             rf"started {holder['started']}\)"):
            with RunLock(tmp_path, MAIN):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, MAIN):  # free again
        pass


@pytest.mark.parametrize("content", ["", "{\"host\": \"h", "\x00\xff garbage", "[1, 2]", '{"pid": "x"}'],
                         ids=["empty", "cut", "garbage", "not-a-dict", "bad-pid"])
def test_a_killed_runs_empty_or_garbage_lock_is_taken(tmp_path, content):
    (tmp_path / LOCK_NAME).write_bytes(content.encode("latin-1"))
    with RunLock(tmp_path, MAIN):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_naming_a_live_unrelated_pid_is_taken(tmp_path):
    """A container restart reuses pids: the lock names a process that runs, but holds nothing."""
    _leave_lock(tmp_path, os.getppid())
    with RunLock(tmp_path, MAIN):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_held_lock_that_says_nothing_is_refused_without_none(tmp_path):
    """Held (flock) while its facts are empty: a run just starting. No 'host None, pid None'."""
    path = tmp_path / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    run_lock.fcntl.flock(fd, run_lock.fcntl.LOCK_EX)
    try:
        path.write_text("garbage")
        with pytest.raises(UsageError, match="in use by another run, which has not yet said who it is") as e:
            with RunLock(tmp_path, MAIN):
                pass
        assert "None" not in str(e.value)
    finally:
        os.close(fd)


# ---- file systems without flock: the lock is the file, judged before it is removed ----

def test_without_flock_a_dead_runs_or_a_reused_pids_lock_is_taken(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    for pid, extra in [(_dead_pid(), {}), (os.getppid(), {"pid_started": 1}), (os.getpid(), {})]:
        _leave_lock(tmp_path, pid, **extra)  # dead; alive but started at another time; our own pid
        with RunLock(tmp_path, MAIN) as lock:
            assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert os.listdir(tmp_path) == []


def test_without_flock_a_live_run_is_refused_and_an_unverifiable_pid_says_how_to_check(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    parent = os.getppid()
    _leave_lock(tmp_path, parent, pid_started=process_start(parent))  # that very process: a live run
    with pytest.raises(UsageError, match=rf"pid {parent}, started 2024-01-01 00:00:00\): choose another run.dir, "
                                         rf"or wait for that run to end$"):
        with RunLock(tmp_path, MAIN):
            pass
    _leave_lock(tmp_path, parent)  # an older lock, without the start time: cannot be told from a reused pid
    with pytest.raises(UsageError, match=rf"if `ps -p {parent} -o lstart,args` shows no run on this folder, "
                                         rf"pid {parent} was reused, as after a container restart: delete "
                                         rf"{tmp_path / LOCK_NAME}"):
        with RunLock(tmp_path, MAIN):
            pass
    _leave_lock(tmp_path, parent, host="elsewhere")
    with pytest.raises(UsageError, match=rf"cannot be checked from here: if it is gone, delete {tmp_path / LOCK_NAME}"):
        with RunLock(tmp_path, MAIN):
            pass


def test_without_flock_an_empty_lock_is_a_run_starting_until_it_is_old(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    path = tmp_path / LOCK_NAME
    path.write_text("")
    with pytest.raises(UsageError, match="has not yet said who it is"):
        with RunLock(tmp_path, MAIN):
            pass
    old = time.time() - 2 * run_lock.WRITE_GRACE_S
    os.utime(path, (old, old))  # a kill between creating and writing it, long ago
    with RunLock(tmp_path, MAIN) as lock:
        assert lock.held
