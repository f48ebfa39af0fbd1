"""Training from tar shards (launch/make_shards.py, data.source = shards): SIGKILLed mid-epoch and
resumed with run.resume=auto, with 1 process (2 loader workers) and 2-process CPU DDP, ends
bitwise identical to an uninterrupted run; damaged shards and bad arguments end in one line."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from helpers import (accelerate_launch, finish_script, make_image_folder, run_env, run_in_process, run_script,
                     start_script)
from resume_runs import assert_same_bits, metrics_without_timing, step_folders, tiny_run_args

@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    """36 images, 27 for training in shards of ~3 samples (so epochs cross shard boundaries), 9 validation."""
    root = tmp_path_factory.mktemp("shards")
    images = make_image_folder(root / "images")
    r = run_script("make_shards.py", f"data.root={images}", "model.name=tiny_cnn", "data.val_fraction=0.25",
                   "--out", str(root / "shards"), "--shard-size", "7KB", cwd=root,
                   env=run_env(IMGTRAIN_AUDIT_DIR=str(root / "audit")))
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((root / "shards" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 27 and len(index["splits"]["train"]["shards"]) >= 5
    return root / "shards"


def shard_run_args(shards, run_dir, *extra):
    # Two epochs: each test's first kill is in epoch 1, so its resumed run also goes on into a fresh
    # epoch's order.
    return tiny_run_args(shards, run_dir, "data.source=shards", "data.shuffle_buffer=6", "train.epochs=2", *extra)


def train(shards, run_dir, *extra, crash: str = "", launcher=()):
    return finish_script(start_training(shards, run_dir, *extra, crash=crash, launcher=launcher))


def start_training(shards, run_dir, *extra, crash: str = "", launcher=()):
    return start_script("train.py", *shard_run_args(shards, run_dir, *extra), cwd=run_dir.parent, launcher=launcher,
                        env=run_env(IMGTRAIN_CRASH_AT=crash))


def two_processes():
    # Each launch its own rendezvous port: the reference trains while the killed run does.
    return accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")


def assert_same_run(reference, run):
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_bits(reference / name, run / name)
    assert metrics_without_timing(run) == metrics_without_timing(reference)


def test_one_process_two_workers_killed_mid_epoch_and_resumed_ends_bitwise_identical(shard_folder, tmp_path):
    # 27 samples, batch 4: 7 steps per epoch (the last of 3 samples), 14 in all; a checkpoint every 3 steps.
    common = ("data.num_workers=2",)
    reference = tmp_path / "reference"
    started = start_training(shard_folder, reference, *common)  # trains while the runs below are killed

    run = tmp_path / "killed"
    r = train(shard_folder, run, *common, crash="after_step:5")  # epoch 1, batch 5: resumes at batch 3
    assert r.returncode == -signal.SIGKILL
    assert step_folders(run) == ["step-00000003"]
    other_workers = tmp_path / "resumed-with-one-worker"
    shutil.copytree(run, other_workers)
    r = train(shard_folder, run, *common, "run.resume=auto", crash="after_step:11")  # epoch 2, batch 4
    assert r.returncode == -signal.SIGKILL and "step-00000003" in r.stdout
    r = train(shard_folder, run, *common, "run.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000009" in r.stdout
    r = finish_script(started)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "27 training samples in" in r.stdout
    assert_same_run(reference, run)

    # Another worker count draws another order: the run goes on, with one line saying how to be exact
    # (in-process: what is tested is reading the checkpoint's files).
    r = run_in_process("train.py", *shard_run_args(shard_folder, other_workers, "data.num_workers=1",
                                                   "run.resume=auto"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("warning: the checkpoint's training order was drawn for data.num_workers=2, this run's for "
            "data.num_workers=1: training continues from the same 12 samples seen but results will not be "
            "bitwise identical (set data.num_workers=2 to resume exactly)") in r.stdout


def test_two_processes_killed_mid_epoch_and_resumed_end_bitwise_identical(shard_folder, tmp_path):
    # 27 samples padded to 28: 14 per process, 4 steps per epoch (4, 4, 4, 2 samples), 8 in all.
    common = ("data.num_workers=1", "train.checkpoint_every_steps=2")
    reference = tmp_path / "reference"
    started = start_training(shard_folder, reference, *common, launcher=two_processes())
    run = tmp_path / "killed"
    r = train(shard_folder, run, *common, crash="after_step:3", launcher=two_processes())  # epoch 1, batch 3
    assert r.returncode != 0
    assert step_folders(run)[-1] == "step-00000002"
    r = train(shard_folder, run, *common, "run.resume=auto", launcher=two_processes())  # on into epoch 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000002" in r.stdout
    r = finish_script(started)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(reference, run)


def test_damaged_shards_and_bad_arguments_end_in_one_line_with_nothing_written(shard_folder, tmp_path):
    damaged = shutil.copytree(shard_folder, tmp_path / "damaged")
    shard = damaged / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, one byte of an image changed
    shard.write_bytes(bytes(data))
    # Refused before any training: the entry points run in-process (the tests above and the fixture run
    # train.py and make_shards.py as real processes).
    run_dir = tmp_path / "run"
    r = run_in_process("train.py", *shard_run_args(damaged, run_dir), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {shard} is damaged: its sha256 differs from index.json's; copy it again or rewrite the shards"]
    assert not run_dir.exists()
    (damaged / "index.json").unlink()
    r = run_in_process("train.py", *shard_run_args(damaged, run_dir), cwd=tmp_path)
    last_line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last_line.startswith(f"error: {damaged / 'index.json'} not found")
    assert not run_dir.exists()

    images = make_image_folder(tmp_path / "images", per_class=4)
    cases = [(("--out", str(shard_folder)), f"error: --out {shard_folder} already exists and is not empty"),
             (("--out", str(tmp_path / "x"), "--shard-size", "lots"), "error: --shard-size 'lots': give bytes"),
             (("--out", str(tmp_path / "x"), "data.source=shards"), "error: the config already reads shards")]
    for args, line in cases:
        r = run_in_process("make_shards.py", f"data.root={images}", "model.name=tiny_cnn", *args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(line), r.stderr
    assert not (tmp_path / "x").exists()
