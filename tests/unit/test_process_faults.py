"""Process faults, in-process or with small Python processes (no torch in them): ranks die with
their launcher (trainer/files/launcher_death.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.files.launcher_death import is_launcher_command

REPO = Path(__file__).resolve().parents[2]
# A rank as launch/train.py starts: its parent read first, then the request to die with it.
RANK = (f"import os, sys, time; first = os.getppid(); sys.path.insert(0, {str(REPO)!r}); "
        "from trainer.files.launcher_death import die_with_launcher\n"
        "try:\n    die_with_launcher(first)\nexcept Exception as e:\n    print('error:', e, flush=True); sys.exit(1)\n"
        "print('armed', flush=True); time.sleep(60)")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _rank_env() -> dict:
    return {**os.environ, "TORCHELASTIC_RUN_ID": "test"}


@pytest.mark.parametrize("command, launcher", [
    ([b"/venv/bin/python3.11", b"/venv/bin/accelerate", b"launch", b"--multi_gpu", b"launch/train.py"], True),
    ([b"/usr/bin/python3", b"/venv/bin/torchrun", b"--nproc-per-node", b"2", b"train.py"], True),
    ([b"python", b"-m", b"torch.distributed.run", b"train.py"], True),
    ([b"/sbin/init"], False),
    ([b"/usr/bin/tini", b"--", b"bash"], False),
    ([b"bash"], False),
    ([], False),  # a parent already gone
])
def test_launchers_are_told_from_what_adopts_an_orphan(command, launcher, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert is_launcher_command(command) is launcher


def test_under_torchrun_any_python_parent_is_its_elastic_agent(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert is_launcher_command([b"/venv/bin/python3", b"my_agent.py"])
    assert not is_launcher_command([b"/usr/lib/systemd/systemd", b"--user"])


def test_a_rank_dies_with_its_launcher():
    # The launcher starts the rank in a session of its own, as torchrun does, and is then SIGKILLed.
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         f"rank = subprocess.Popen([sys.executable, '-c', {RANK!r}], start_new_session=True)\n"
         "print(rank.pid, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=_rank_env())
    rank = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "armed"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(rank), "the rank outlived its launcher"
    finally:
        if _alive(rank):
            os.kill(rank, signal.SIGKILL)
        launcher.kill()


def test_a_rank_whose_launcher_ended_before_it_asked_stops_in_one_line():
    # The parent the rank read first is no longer its parent: it was adopted while starting.
    code = RANK.replace("first = os.getppid()", "first = os.getppid() + 100000")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_rank_env(), timeout=30)
    assert r.returncode == 1
    assert r.stdout.startswith("error: the launcher (pid ") and "ended while this process" in r.stdout
    # Adopted before its first instruction: its parent is no launcher (here a shell; in a container, init).
    r = subprocess.run(["sh", "-c", f"{sys.executable} -c \"$RANK_CODE\"; true"], capture_output=True, text=True,
                       env={**_rank_env(), "RANK_CODE": RANK}, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("error: the launcher (pid "), r.stdout + r.stderr


def test_a_process_no_launcher_started_is_left_alone(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    r = subprocess.run([sys.executable, "-c", RANK.replace("time.sleep(60)", "pass")], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "armed"  # went on: nothing to die with
