"""Faults and bad inputs a user meets, as real `launch/train.py` processes: the exit code, the one
line it prints, and the files on disk before and after. Nothing intact is ever lost. Refusals that
come before any training run the same entry point in-process (helpers.run_in_process), which
saves an interpreter start each; every fault that needs a process (a kill, a lock held by another
process, a full disk mid-run, a launcher) runs one; the runs after a fault, which read what it left
on disk, run in-process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import ACCELERATE, PYTHON, REPO, free_port, make_image, make_image_folder, run_env, run_in_process, run_script
from trainer.files.model_file import read_metadata
from trainer.files.checkpoints import COMPLETE, verify

TINY = ["model.name=tiny_cnn", "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.precision=no",
        "optim.lr=0.01", "runtime.device=cpu"]


def _train(root, run_dir, *extra, env=None, cwd=None, runner=run_script):
    kwargs = {} if runner is run_in_process else {"env": env}
    return runner("train.py", f"data.root={root}", f"run.dir={run_dir}", *TINY, *extra, cwd=cwd or run_dir.parent,
                  **kwargs)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(result, code: int) -> str:
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def _finished(tmp_path_factory):
    """One run of 2 epochs, finished, and its images; tests change copies of it (finished_run)."""
    root = tmp_path_factory.mktemp("finished")
    images = make_image_folder(root / "images")
    run_dir = root / "run"
    # In-process: the tests read its files (its audit cache goes to the session's folder, conftest.py).
    result = run_in_process("train.py", f"data.root={images}", f"run.dir={run_dir}", *TINY, "train.epochs=2", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return images, run_dir


@pytest.fixture
def finished_run(_finished, tmp_path):
    """A copy of a finished run of 2 epochs: checkpoints, best/last and metrics.jsonl on disk."""
    return shutil.copytree(_finished[1], tmp_path / "run", symlinks=True)


@pytest.fixture
def finished_images(_finished):
    return _finished[0]


# ---- one run per folder ----

def test_a_second_run_on_a_busy_folder_is_refused_and_a_dead_runs_lock_is_taken_over(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([PYTHON, str(REPO / "launch" / "train.py"), f"data.root={image_folder}",
                              f"run.dir={run_dir}", *TINY, "train.epochs=200"], cwd=tmp_path, env=run_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), 120)
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid
        # The refused run in-process: the lock is checked before anything else (the run below is a process).
        line = _one_error_line(_train(image_folder, run_dir, "train.epochs=2", "run.resume=auto",
                                      runner=run_in_process), 2)
        assert f"is in use by another run (host {holder['host']}, pid {first.pid}, started {holder['started']})" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Killed: its lock is left behind, stale. The next run takes it over and continues the run.
    assert (run_dir / ".lock").is_file()
    result = _train(image_folder, run_dir, "train.epochs=2", "run.resume=auto", runner=run_in_process)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (run_dir / ".lock").exists()


def test_killing_the_launcher_leaves_no_ddp_rank_running(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / "launch" / "train.py"), f"data.root={image_folder}", f"run.dir={run_dir}", *TINY,
         "train.epochs=200"],
        cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), 180)
        assert len(_processes_using(run_dir)) >= 3  # the launcher and its two ranks
        launcher.send_signal(signal.SIGKILL)  # the launcher alone, as a lost SSH session or OOM killer would
        launcher.wait()
        _wait_for(lambda: not _processes_using(run_dir), 30)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if _processes_using(run_dir) else None


def test_a_run_dir_that_is_a_file_is_refused_before_any_work(image_folder, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    started = time.perf_counter()
    line = _one_error_line(_train(image_folder, blocker / "run", cwd=tmp_path), 2)
    assert "is a file, not a folder" in line and "run.dir" in line
    assert time.perf_counter() - started < 30  # one interpreter start: no audit, no model build
    assert not (tmp_path / "audit-cache").exists()


# ---- resume never makes things worse ----

def test_auto_resume_with_every_checkpoint_damaged_changes_nothing(finished_images, finished_run):
    for folder in (finished_run / "checkpoints").glob("step-*"):
        model = folder / "model.safetensors"
        model.write_bytes(model.read_bytes()[:100])
    before = _snapshot(finished_run)
    line = _one_error_line(_train(finished_images, finished_run, "train.epochs=3", "run.resume=auto",
                                  runner=run_in_process), 2)
    assert "every checkpoint" in line and "is damaged" in line and "another run.dir" in line
    assert _snapshot(finished_run) == before


def test_a_hand_edited_state_json_is_named(finished_images, finished_run):
    folder = finished_run / "checkpoints" / (finished_run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((folder / "state.json").read_text())
    del state["global_step"]
    (folder / "state.json").write_text(json.dumps(state))
    marker = json.loads((folder / COMPLETE).read_text())  # a consistent edit: the checksum follows
    data = (folder / "state.json").read_bytes()
    marker["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / COMPLETE).write_text(json.dumps(marker))
    result = _train(finished_images, finished_run, "train.epochs=3", f"run.resume={folder}", runner=run_in_process)
    line = _one_error_line(result, 2)
    assert "state.json has no 'global_step'" in line


# ---- faults while writing ----

def test_a_full_disk_during_a_checkpoint_ends_in_one_line_and_keeps_the_earlier_ones(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    # Checkpoints every 2 steps; the disk is "full" while the one after step 4 is written.
    env = run_env(IMGTRAIN_CRASH_AT="checkpoint_files:4", IMGTRAIN_CRASH_SIGNAL="ENOSPC")
    line = _one_error_line(_train(image_folder, run_dir, "train.epochs=3", "train.checkpoint_every_steps=2", env=env), 1)
    assert "could not write checkpoint" in line and "No space left on device" in line and "intact" in line
    checkpoints = run_dir / "checkpoints"
    assert not list(checkpoints.glob(".tmp-*"))
    assert verify(checkpoints / "step-00000002")["global_step"] == 2
    result = _train(image_folder, run_dir, "train.epochs=3", "train.checkpoint_every_steps=2", "run.resume=auto",
                    runner=run_in_process)
    assert result.returncode == 0 and "step-00000002" in result.stdout


def test_a_full_disk_while_writing_last_safetensors_keeps_the_previous_one(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    env = run_env(IMGTRAIN_CRASH_AT="model_file:2", IMGTRAIN_CRASH_SIGNAL="ENOSPC")
    line = _one_error_line(_train(image_folder, run_dir, "train.epochs=3", env=env), 1)
    assert f"could not write {run_dir / 'last.safetensors'}" in line
    assert read_metadata(run_dir / "last.safetensors")["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


# ---- bad inputs ----

def test_a_text_file_as_weights_is_one_line(image_folder, tmp_path):
    weights = tmp_path / "x.pth"
    weights.write_text("these are not weights\n" * 10)
    # In-process: refused before any training (a model built, weights read: a process in test_bad_inputs.py).
    line = _one_error_line(_train(image_folder, tmp_path / "run", f"model.weights={weights}",
                                  runner=run_in_process), 2)
    assert f"{weights} is not a readable torch weights file" in line
    assert not (tmp_path / "run").exists()


def test_small_images_train_instead_of_being_dropped(tmp_path):
    """25x25 face-crop-sized images at image_size 64: upsampled, every class kept."""
    root = tmp_path / "small"
    for name, channel in (("a", 0), ("b", 2)):
        (root / name).mkdir(parents=True)
        for i in range(8):
            make_image(__import__("numpy").random.default_rng(i), channel, size=25).save(root / name / f"{i}.png")
    Image.new("RGB", (2, 500)).save(root / "a" / "sliver.png")  # degenerate: still left out
    # In-process: what is tested is which files the data reads.
    result = run_in_process("train.py", f"data.root={root}", f"run.dir={tmp_path / 'run'}", *TINY,
                            "data.image_size=64", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left out 1 of 17 files (1 too_small)" in result.stdout  # the sliver alone
    assert read_metadata(tmp_path / "run" / "best.safetensors")["class_names"] == ["a", "b"]


def test_the_audit_says_when_a_class_has_no_usable_images(tmp_path):
    root = tmp_path / "broken"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(b"not a jpeg")
    # In-process: audit.py runs as a process in test_audit_cli.py.
    result = run_in_process("audit.py", str(root), "--no-cache", cwd=tmp_path)
    assert "infx" not in result.stdout and "some train class has no usable images" in result.stdout


# ---- helpers ----

def _wait_for(condition, seconds: float) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {seconds} s")
        time.sleep(0.2)


def _processes_using(run_dir: Path) -> list[int]:
    """PIDs whose command line names `run_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(run_dir).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


# ---- a failed accelerate launch ends with the project's line ----

@pytest.mark.parametrize("flags", [("-q", "--num_processes", "1"), ("--multi_gpu", "--num_processes", "2")])
def test_a_failed_accelerate_launch_ends_with_the_error_line(tmp_path, flags):
    result = subprocess.run(
        [ACCELERATE, "launch", *flags, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), str(REPO / "launch" / "train.py"),
         f"data.root={tmp_path / 'missing'}", "model.name=tiny_cnn"],
        cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip("= \n")]
    # One process with -q: nothing after the line. Several: torchrun's table, whose root cause is the line.
    assert lines[-1].endswith(f"error: data.root does not exist: {tmp_path / 'missing'}"), lines[-5:]
