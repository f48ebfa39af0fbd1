"""Kill-and-resume with 2-process CPU DDP (`accelerate launch --multi_gpu`), and resuming with 1 process."""

from __future__ import annotations

import json
import shutil

from helpers import accelerate_launch, finish_script, run_env, run_in_process, start_script
from resume_runs import assert_same_bits, metrics_without_timing, step_folders, tiny_run_args
from trainer.files.checkpoints import COMPLETE, verify

def train_ddp(image_folder, run_dir, *extra, crash: str = ""):
    return finish_script(start_ddp(image_folder, run_dir, *extra, crash=crash))


def start_ddp(image_folder, run_dir, *extra, crash: str = ""):
    # 27 images padded to 28: 14 per process, 4 steps per epoch (4, 4, 4, 2 images), 12 in all.
    args = tiny_run_args(image_folder, run_dir, "data.num_workers=0", "train.checkpoint_every_steps=2", *extra)
    # Each launch its own rendezvous port: the reference trains while the killed run does.
    return start_script("train.py", *args, cwd=run_dir.parent, launcher=two_processes(),
                        env=run_env(IMGTRAIN_CRASH_AT=crash))


def two_processes():
    return accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")


def test_two_process_run_with_ema_killed_and_resumed_ends_bitwise_identical(image_folder, tmp_path):
    # The run keeps an EMA of its weights: every process keeps the same average (the weights are the
    # same after each step) and evaluates it; the main process saves it, and both load it back on resume.
    # The same kill proves the resume of the raw weights and of the average.
    ema = "train.ema_decay=0.9"
    reference = tmp_path / "reference"
    started = start_ddp(image_folder, reference, ema)  # trains while the runs below are killed

    run = tmp_path / "killed"
    # SIGKILLed while checkpoint 8 (the end of epoch 2) is written: the newest complete checkpoint is
    # step 6, mid-epoch (2 of epoch 2's 4 steps), so the resume below starts mid-epoch. (Kills at
    # other points, and a resumed run killed again, are test_resume_killed.py's, with one process.)
    r = train_ddp(image_folder, run, ema, crash="checkpoint_write:8")
    assert r.returncode != 0
    assert not (run / "checkpoints" / ".tmp-step-00000008" / COMPLETE).exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert step_folders(run)[-1] == "step-00000006"
    saved = verify(run / "checkpoints" / "step-00000006")
    assert saved["num_processes"] == 2 and saved["ema"]["updates"] == 6
    assert {p.name for p in (run / "checkpoints" / "step-00000006").glob("rank-*")} == {
        "rank-0.json", "rank-0.safetensors", "rank-1.json", "rank-1.safetensors"}
    one_process_copy = tmp_path / "resumed-with-one-process"
    shutil.copytree(run, one_process_copy)
    r = train_ddp(image_folder, run, ema, "run.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000006" in r.stdout

    r = finish_script(started)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("last.safetensors", "best.safetensors", "ema.safetensors"):
        assert_same_bits(reference / name, run / name)
    rows = metrics_without_timing(run)
    assert rows == metrics_without_timing(reference)
    assert [row["val_images"] for row in rows] == [9, 9, 9] and all("ema_val_acc" in row for row in rows)

    # The same 2-process checkpoint resumed by 1 process (its interrupted write cleared away): a
    # warning, the same samples seen, no bitwise claim.
    # In-process: what is tested is reading the 2-process checkpoint's files.
    r = run_in_process("train.py", *tiny_run_args(image_folder, one_process_copy, "data.num_workers=0",
                                                  "train.checkpoint_every_steps=2", ema, "run.resume=auto"),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resuming a 2-process checkpoint with 1 processes: training continues from the same 44 samples "
            "seen, but results will not be bitwise identical") in r.stdout
    rows = [json.loads(line) for line in (one_process_copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # Epoch 2 counts the 16 samples the two processes trained on before the kill plus the 11 left
    # for one process; epoch 3 is one process's whole epoch.
    assert [row["train_images"] for row in rows] == [28, 27, 27]
    assert verify(one_process_copy / "checkpoints" / step_folders(one_process_copy)[-1])["num_processes"] == 1
