"""Process faults, in-process or with small processes (no torch in them): ranks die with their
launcher (trainer/files/launcher_death.py); a collective that fails names the rank that stopped
answering (trainer/assemble/process_group.py); a second Ctrl-C says what it stops (trainer/fit/signals.py)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.errors import ConfigError
from helpers import run_in_process
from trainer.assemble.process_group import (Peer, group_kwargs, peer_fault, process_state, speaks_for_the_group,
                                            waited_at)
from trainer.assemble.run_config import load_config
from trainer.files.launcher_death import is_launcher_command
from trainer.fit.signals import StopSignals

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


# ---- a collective that fails: runtime.ddp_timeout and the line naming the rank (trainer/assemble/process_group.py)

def _stopped_process() -> subprocess.Popen:
    sleeper = subprocess.Popen(["sleep", "60"])
    os.kill(sleeper.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while process_state(sleeper.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.01)
    return sleeper


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _peers(other_pid: int, other_host: str | None = None) -> list[Peer]:
    return [Peer(0, socket.gethostname(), os.getpid()), Peer(1, other_host or socket.gethostname(), other_pid)]


GLOO_TIMEOUT = RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
                            "for recv operation to complete")
GLOO_PEER_GONE = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                              "[127.0.0.1]:28838. This is typically caused by a remote worker crashing.")


def test_a_stopped_rank_is_named_with_what_to_do():
    sleeper = _stopped_process()
    try:
        assert peer_fault(GLOO_TIMEOUT, _peers(sleeper.pid), 20) == (
            f"rank 0 waited 3 s for the other processes, and rank 1 (pid {sleeper.pid}, this host) is stopped "
            f"(SIGSTOP, Ctrl-Z or a debugger): resume it (kill -CONT {sleeper.pid}) or end the run and continue "
            "with run.resume=auto. A rank that is only slow needs a longer runtime.ddp_timeout (now 20 s)")
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("error", [GLOO_PEER_GONE, GLOO_TIMEOUT])
def test_a_dead_rank_is_named_by_the_survivor(error):
    pid = _dead_pid()
    assert peer_fault(error, _peers(pid), 300) == (
        f"rank 0 lost rank 1 (pid {pid}): it ended while the others waited for it; its own output or the "
        "launcher's says why (killed by the OOM killer, a signal, an error). The last complete checkpoint is "
        "kept: continue with run.resume=auto")


def test_a_rank_on_another_host_is_pointed_at():
    assert peer_fault(GLOO_TIMEOUT, _peers(1, "node-7"), 300) == (
        "rank 0 waited 3 s for the other processes; no process on this host is stopped or gone; check the ranks "
        "on node-7. If a process is only slow (torch.compile's first steps of a large model, a checkpoint "
        "written to a slow disk), raise runtime.ddp_timeout (now 300 s); then continue with run.resume=auto")


def test_a_lost_connection_to_another_host_points_there():
    assert peer_fault(GLOO_PEER_GONE, _peers(1, "node-7"), 300) == (
        "rank 0 lost its connection to another process: one on node-7 ended or its network failed; its own "
        "output or the launcher's says why. Continue with run.resume=auto")


def test_other_errors_keep_their_traceback():
    assert peer_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), _peers(1), 300) is None
    assert peer_fault(GLOO_TIMEOUT, [], 300) is None  # one process: no peers to blame
    assert peer_fault(TimeoutError("timed out"), _peers(1), 300) is None  # not torch.distributed's


def test_the_line_says_where_in_the_project_it_waited():
    def wait_for_everyone():
        raise RuntimeError("Timed out waiting 3000ms for recv operation to complete")

    try:
        wait_for_everyone()
    except RuntimeError as e:
        assert re.fullmatch(r" at tests/unit/test_process_faults.py:\d+ \(wait_for_everyone\)", waited_at(e))


def test_the_lowest_rank_still_answering_speaks():
    host = socket.gethostname()
    dead, sleeper = _dead_pid(), _stopped_process()
    try:
        me = Peer(1, host, os.getpid())
        assert speaks_for_the_group([Peer(0, host, dead), me])  # rank 0 is gone: rank 1 says it
        assert speaks_for_the_group([Peer(0, host, sleeper.pid), me])  # rank 0 is stopped
        assert not speaks_for_the_group([Peer(0, host, os.getppid()), me])  # rank 0 answers and says it
        assert not speaks_for_the_group([Peer(0, "node-7", 1), me])  # rank 0 elsewhere says it
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("seconds", [5, 300, 600, 1800])
def test_the_timeout_reaches_the_process_group(seconds):
    # Accelerate passes only values that differ from its own defaults (600 s): 600 must still be passed.
    sent = group_kwargs(seconds).to_kwargs()
    assert abs(sent["timeout"].total_seconds() - seconds) < 1e-3


def test_the_timeout_is_a_config_key_with_a_default_far_below_torchs(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn"])
    assert 0 < cfg.runtime.ddp_timeout <= 600
    with pytest.raises(ConfigError, match="runtime.ddp_timeout must be a positive number of seconds"):
        load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", "runtime.ddp_timeout=0"])


# ---- Ctrl-C, once and twice (trainer/fit/signals.py)

class _OneProcess:
    num_processes = 1


@pytest.mark.parametrize("newest", ["step-00000006", None])
def test_each_ctrl_c_says_what_it_does_and_the_second_what_is_kept(newest, tmp_path, capfd):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    if newest:
        (checkpoints / "latest").write_text(newest + "\n")
    signals = StopSignals(_OneProcess(), checkpoints)
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.agreed(1, last_of_epoch=False)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.close()
    kept = (f"run.resume=auto continues from the newest complete checkpoint, {checkpoints / newest}" if newest
            else "no checkpoint was complete yet: run.resume=auto starts the run over")
    assert capfd.readouterr().err.split("\n") == [
        "", "SIGINT: finishing this step and writing a checkpoint (Ctrl-C again stops at once, without one)",
        "", f"second Ctrl-C: stopping now, without a checkpoint; {kept}", ""]


def test_a_second_ctrl_c_ends_the_run_with_exit_130_and_its_line(image_folder, tmp_path, monkeypatch):
    # The whole path, in-process: both Ctrl-Cs arrive in the second step; run_main turns the
    # KeyboardInterrupt into exit 130 and the line is the last on stderr, without a traceback.
    from trainer.fit import loop

    real_step, steps = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    r = run_in_process("train.py", f"data.root={image_folder}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                       "data.image_size=16", "data.num_workers=0", "data.batch_size=4", "runtime.device=cpu",
                       cwd=tmp_path)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == ("second Ctrl-C: stopping now, without a checkpoint; no checkpoint "
                                                  "was complete yet: run.resume=auto starts the run over")


def test_a_preempted_run_outlives_a_second_sigterm_while_it_finishes(image_folder, tmp_path, monkeypatch):
    # A pruned or preempted DDP trial: once one rank has exited 75, torch elastic sends SIGTERM to the
    # others, which may be finishing W&B or unwinding. They must still exit 75 with their checkpoint.
    # Here the second SIGTERM arrives inside end_training and again after; a recorder stands in for
    # the default handler, so a regression is a recorded kill instead of a killed test worker.
    from accelerate import Accelerator

    from trainer.fit import loop

    real_step, real_end, steps, kills = loop.train_step, Accelerator.end_training, [], []

    def preempted_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    def end_training_under_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_end(self)

    monkeypatch.setattr(loop, "train_step", preempted_step)
    monkeypatch.setattr(Accelerator, "end_training", end_training_under_sigterm)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: kills.append(signum))
    try:
        r = run_in_process("train.py", f"data.root={image_folder}", f"run.dir={tmp_path / 'run'}",
                           "model.name=tiny_cnn", "data.image_size=16", "data.num_workers=0", "data.batch_size=4",
                           "runtime.device=cpu", cwd=tmp_path)
        os.kill(os.getpid(), signal.SIGTERM)  # after the run: the test's own handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.returncode == 75, r.stderr[-2000:]
    assert "stopped by signal SIGTERM after step 2" in r.stdout + r.stderr
    assert kills == [signal.SIGTERM]  # only the test's own, after the run
