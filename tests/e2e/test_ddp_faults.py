"""DDP process faults with a real `accelerate launch` of 2 CPU processes (gloo): a launcher killed
while its ranks start leaves no rank behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from helpers import REPO, accelerate_launch, run_env
from resume_runs import tiny_run_args

TWO_PROCESSES = accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, waiting for whoever adopted it to reap it


def _processes_naming(marker: str, besides: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == besides:
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command and b"launch/train.py" in command and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_ranks_die_with_a_launcher_killed_while_they_start(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([*TWO_PROCESSES, str(REPO / "launch" / "train.py"),
                                 *tiny_run_args(image_folder, run_dir, "data.num_workers=0")],
                                cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            ranks = _processes_naming(f"run.dir={run_dir}", besides=launcher.pid)
            time.sleep(0.02)
        assert len(ranks) == 2, "the launcher never started its two ranks"
        time.sleep(0.5)  # the ranks are importing torch: no process group yet, no run lock
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, ranks)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in ranks if _alive(pid)], "ranks outlived their launcher"
        assert not run_dir.exists() or not any(run_dir.iterdir())
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def test_a_stopped_rank_is_named_after_the_timeout(image_folder, tmp_path):
    # Rank 1 is stopped mid-training (SIGSTOP: what a hung file system or a stuck device looks like
    # to the others); rank 0 gives up after runtime.ddp_timeout and says which rank and what to do.
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([*TWO_PROCESSES, str(REPO / "launch" / "train.py"),
                                 *tiny_run_args(image_folder, run_dir, "data.num_workers=0", "train.epochs=200",
                                                "runtime.ddp_timeout=3")],
                                cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "config.toml").exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        ranks = _processes_naming(f"run.dir={run_dir}", besides=launcher.pid)
        (stopped,) = [pid for pid in ranks if _rank_of(pid) == 1]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        lines = []
        for line in launcher.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("error:"):
                break
        took = time.monotonic() - stopped_at
        assert [line for line in lines if line.startswith(("error:", "Traceback"))] == lines[-1:], lines
        assert re.fullmatch(
            r"error: rank 0 waited 3 s for the other processes at trainer/fit/[\w/.]+:\d+ \(\w+\), and rank 1 "
            rf"\(pid {stopped}, this host\) is stopped \(SIGSTOP, Ctrl-Z or a debugger\): resume it \(kill -CONT "
            rf"{stopped}\) or end the run and continue with run.resume=auto. A rank that is only slow needs a longer "
            r"runtime.ddp_timeout \(now 3 s\)", lines[-1]), lines[-1]
        assert 2.5 <= took < 20, took  # the configured timeout, not torch's 30 minutes
    finally:
        launcher.kill()
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
