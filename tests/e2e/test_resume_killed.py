"""Resume exactly and lose nothing: kill a real run anywhere, resume it, get the same bits.

Runs `python launch/train.py` as subprocesses that SIGKILL or SIGTERM themselves at named
points (trainer/files/faults.py), then compares with an uninterrupted run. The run keeps an EMA of its
weights (train.ema_decay), so the same kills prove the resume of the raw weights and the average.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import finish_script, run_env, run_in_process, run_script, start_script
from resume_runs import assert_same_bits, metrics_without_timing, step_folders, tiny_run_args
from trainer.files.model_file import read_metadata
from trainer.fit.signals import EXIT_PREEMPTED
from trainer.files.checkpoints import COMPLETE, verify


def train(image_folder, run_dir, *extra, crash: str = "", crash_signal: str = "KILL"):
    env = run_env(IMGTRAIN_CRASH_AT=crash, IMGTRAIN_CRASH_SIGNAL=crash_signal)
    return run_script("train.py", *tiny_run_args(image_folder, run_dir, *extra), cwd=run_dir.parent, env=env)


def start_training(image_folder, run_dir, *extra):
    return start_script("train.py", *tiny_run_args(image_folder, run_dir, *extra), cwd=run_dir.parent)


def logged_steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "images_per_sec"} for row in rows]


def test_killed_anywhere_and_resumed_ends_bitwise_identical_with_its_ema(image_folder, tmp_path):
    # 27 training images, batch 4: 7 steps per epoch, 21 in all; a checkpoint every 3 steps.
    # augmentation runs in a worker process and must replay there; steps logged every 2 batches.
    # The weights' moving average is training state too: one killed run with it proves the resume of
    # the raw weights and of the average (the raw weights are those of a run without it, below).
    common = ("data.num_workers=1", "train.log_every_steps=2", "train.ema_decay=0.9")
    reference = tmp_path / "reference"
    started = start_training(image_folder, reference, *common)  # trains while the runs below are killed

    run = tmp_path / "killed"
    # 1. SIGKILL mid-epoch at step 7: the checkpoint of step 6 is the newest, step 7 is trained again.
    r = train(image_folder, run, *common, crash="after_step:7")
    assert r.returncode == -signal.SIGKILL
    assert step_folders(run) == ["step-00000003", "step-00000006"]
    saved = verify(run / "checkpoints" / "step-00000006")
    assert saved["ema"] == {"decay": 0.9, "warmup": True, "updates": 6}
    assert (run / "checkpoints" / "step-00000006" / "ema.safetensors").is_file()
    # 2. SIGKILL while checkpoint 12 is being written: its files exist, unmarked, under a hidden name;
    # what was there before is untouched and still what `latest` names.
    r = train(image_folder, run, *common, "run.resume=auto", crash="checkpoint_write:12")
    assert r.returncode == -signal.SIGKILL
    assert "resumed from" in r.stdout and "step-00000006" in r.stdout
    tmp = run / "checkpoints" / ".tmp-step-00000012"
    assert (tmp / "model.safetensors").is_file() and not (tmp / COMPLETE).exists()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000009" and verify(run / "checkpoints" / latest)["global_step"] == 9
    # 3. SIGKILL between epochs (after epoch 2's checkpoint, step 14).
    r = train(image_folder, run, *common, "run.resume=auto", crash="epoch_end:2")
    assert r.returncode == -signal.SIGKILL
    assert not tmp.exists()  # the interrupted write was cleared away on resume
    # 4. SIGTERM at step 19: the step finishes, a checkpoint is written, the documented exit code.
    r = train(image_folder, run, *common, "run.resume=auto", crash="after_step:19", crash_signal="TERM")
    assert r.returncode == EXIT_PREEMPTED, r.stderr[-3000:]
    assert "stopped by signal SIGTERM after step 19" in r.stdout
    assert verify(run / "checkpoints" / "step-00000019")["samples_done"] == 20
    # 5. Truncate that newest checkpoint: `auto` names the file, skips it, resumes from step 18.
    model_file = run / "checkpoints" / "step-00000019" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    r = train(image_folder, run, *common, "run.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{model_file} is truncated" in r.stdout
    assert "resumed from" in r.stdout and "step-00000018" in r.stdout

    done = finish_script(started)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("last.safetensors", "best.safetensors", "ema.safetensors"):
        assert_same_bits(reference / name, run / name)
    rows = metrics_without_timing(run)
    assert rows == metrics_without_timing(reference)
    # The history continues across every resume without a gap or a repeat: the step log (the W&B
    # x axis), and the curves drawn from the whole history, byte for byte.
    steps = logged_steps(run)
    assert steps == logged_steps(reference)
    assert [s["step"] for s in steps] == [epoch * 7 + batch + 1 for epoch in range(3) for batch in (0, 2, 4, 6)]
    assert (run / "curves.png").read_bytes() == (reference / "curves.png").read_bytes()
    # Rotation: keep_last = 2 newest, plus the best epoch's (which may be one of them).
    best = (run / "checkpoints" / "best").read_text().strip()
    kept = step_folders(run)
    assert kept[-2:] == ["step-00000018", "step-00000021"] and best in kept
    assert len(kept) == 2 + (best not in kept[-2:])
    assert (run / "checkpoints" / "step-00000019.damaged" / "model.safetensors").is_file()  # set aside, not lost

    # The three model files: raw, average, and the better of the two at the best epoch.
    assert all(0 <= row["ema_val_acc"] <= 1 and row["best_weights"] in ("raw", "ema") for row in rows)
    assert read_metadata(run / "last.safetensors")["weights"] == "raw"
    assert read_metadata(run / "ema.safetensors")["weights"] == "ema"
    # best.safetensors holds the better weights of the best epoch, and says which.
    (best_row,) = [row for row in rows if row["is_best"]][-1:]
    best_meta = read_metadata(run / "best.safetensors")
    prefix = "ema_" if best_row["best_weights"] == "ema" else ""
    assert best_meta["weights"] == best_row["best_weights"] and best_meta["epoch"] == best_row["epoch"]
    assert best_meta["metrics"]["val_loss"] == best_row[prefix + "val_loss"]
    ema, last = load_file(str(run / "ema.safetensors")), load_file(str(run / "last.safetensors"))
    assert not all(torch.equal(ema[k], last[k]) for k in ema)  # an average, not a copy
    # Keeping the average changes nothing about training: the raw weights are those of a run without it
    # (in-process: a run that nothing interrupts; every run above is a real process).
    without = tmp_path / "without-ema"
    r = run_in_process("train.py", *tiny_run_args(image_folder, without, "data.num_workers=1",
                                                  "train.log_every_steps=2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (without / "ema.safetensors").exists()
    assert_same_bits(without / "last.safetensors", run / "last.safetensors")
    # ema.safetensors records its own validation metrics: evaluate.py --split val gives them back
    # (in-process: evaluate.py runs as a subprocess in test_evaluate_run_split.py and test_multilabel_training.py).
    r = run_in_process("evaluate.py", "--checkpoint", str(run / "ema.safetensors"), "--split", "val",
                       "--num-workers", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert report["accuracy"] == rows[-1]["ema_val_acc"]
    assert report["loss"] == pytest.approx(rows[-1]["ema_val_loss"], rel=1e-5, abs=1e-6)

    # Refusals come before any training and write nothing (in-process: the same entry point, the
    # same checks; every run above is a real process). A changed model is refused by name.
    refused = run_in_process("train.py", *tiny_run_args(image_folder, run, *common, "run.resume=auto",
                                                        "model.head=mlp"), cwd=tmp_path)
    assert refused.returncode == 2
    assert "model.head is 'mlp' but the checkpoint was trained with 'linear'" in refused.stderr
    assert step_folders(run) == kept
    # Turning the EMA off on resume is refused in one line, nothing changed.
    refused = run_in_process("train.py", *tiny_run_args(image_folder, run, "data.num_workers=1",
                                                        "train.log_every_steps=2", "run.resume=auto",
                                                        "train.epochs=4"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: cannot resume: the checkpoint keeps EMA weights (train.ema_decay = 0.9) but train.ema_decay is 0; "
        "set train.ema_decay=0.9 or start a new run.dir")
    assert step_folders(run) == kept
    # A finished run resumed with a longer schedule is allowed and said in one line: the cosine is
    # recomputed for 4 epochs (in-process: what is tested is reading the finished run's files).
    r = run_in_process("train.py", *tiny_run_args(image_folder, run, *common, "run.resume=auto", "train.epochs=4"),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (note,) = [line for line in r.stdout.splitlines() if line.startswith("note: resuming with changed")]
    assert "train.epochs 3 -> 4" in note and "recomputed for 4 epochs" in note
    assert [s["step"] for s in logged_steps(run)][-4:] == [22, 24, 26, 28]
