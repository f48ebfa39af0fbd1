"""Sources through real `accelerate launch` runs: a saved Hugging Face dataset trains with one
process; a bad CSV ends in one line. (A CSV listing the folder's files trains bitwise like the
folder itself under 2-process DDP in test_distributed.py, which shares the folder's run.)"""

from __future__ import annotations

import csv
import json
import subprocess

import pytest

from helpers import ACCELERATE, REPO, run_env, run_in_process


def _overrides(run_dir, *extra, epochs=1):
    return [f"run.dir={run_dir}", "model.name=tiny_cnn_nobn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=0", f"train.epochs={epochs}", "optim.lr=0.01", "train.precision=no", *extra]


def _launch(flags, overrides, cwd, env=None):
    cmd = [ACCELERATE, "launch", "-q", *flags, "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400, env=env or run_env())


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_csv_without_the_file_column_ends_in_one_line(images, tmp_path):
    # The folder's files in columns named unlike the defaults; data.csv_file_column left at "file".
    # In-process: refused while the run is built, before any training. That such an error ends a
    # 2-process `accelerate launch` with its line (after torchrun's failure table) is
    # test_reliability.py's test_a_failed_accelerate_launch_ends_with_the_error_line.
    listing = tmp_path / "labels.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "breed", "subset"))
        for p in sorted(images.rglob("*.png")):
            split, label = p.relative_to(images).parts[:2]
            writer.writerow((p.relative_to(images).as_posix(), label, split))
    bad = run_in_process("train.py", f"data.root={images}", "data.source=csv", f"data.csv={listing}",
                         *_overrides(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {listing} has no column 'file' (its columns: path, breed, subset); set data.csv_file_column to "
        "the right one"]
    assert not (tmp_path / "bad").exists()


def test_saved_hugging_face_dataset_trains_with_one_process(images, tmp_path):
    datasets = pytest.importorskip("datasets")
    classes = ["blue", "green", "red"]
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=classes)})
    parts = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((images / split).rglob("*.png"))
        parts[name] = datasets.Dataset.from_dict(
            {"picture": [str(p) for p in files], "kind": [classes.index(p.parent.name) for p in files]},
            features=features)
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    env = run_env(IMGTRAIN_HF_DIR=str(tmp_path / "hf-cache"))
    run = _launch(("--num_processes", "1"), [f"data.root={tmp_path / 'saved'}", "data.source=hf",
                                             "data.hf_image_column=picture", "data.hf_label_column=kind",
                                             *_overrides(tmp_path / "hf", epochs=2)], tmp_path, env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(hf): 3 classes, 48 train / 15 val images" in run.stdout
    history = _history(tmp_path / "hf")
    assert len(history) == 2 and history[-1]["val_acc"] > 0.5  # the colours are learnable in two epochs
