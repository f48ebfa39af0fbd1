"""Every source trains through real `accelerate launch` runs: a CSV listing the folder's files
trains bitwise like the folder itself under 2-process DDP, a saved Hugging Face dataset trains
with one process, and a bad CSV ends in one line under the launcher."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from safetensors.torch import load_file

from helpers import ACCELERATE, REPO, run_env

TWO_PROCESSES = ("--multi_gpu", "--num_machines", "1", "--num_processes", "2")


def _overrides(run_dir, *extra, epochs=1):
    return [f"run.dir={run_dir}", "model.name=tiny_cnn_nobn", "data.image_size=16", "data.batch_size=8",
            "data.num_workers=0", f"train.epochs={epochs}", "optim.lr=0.01", "train.precision=no", *extra]


def _launch(flags, overrides, cwd, env=None):
    cmd = [ACCELERATE, "launch", "-q", *flags, "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400, env=env or run_env())


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_run(a, b):
    keys = ("train_loss", "val_loss", "val_acc")
    assert [{k: r[k] for k in keys} for r in _history(a)] == [{k: r[k] for k in keys} for r in _history(b)]
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_csv_of_the_folders_files_trains_bitwise_like_the_folder_under_ddp(images, tmp_path):
    with open(images / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "breed", "subset"))
        for p in sorted(images.rglob("*.png")):
            split, label = p.relative_to(images).parts[:2]
            writer.writerow((p.relative_to(images).as_posix(), label, split))
    folder = _launch(TWO_PROCESSES, [f"data.root={images}", *_overrides(tmp_path / "folder")], tmp_path)
    assert folder.returncode == 0, folder.stderr[-3000:]
    from_csv = _launch(TWO_PROCESSES, [f"data.root={images}", "data.source=csv", "data.csv=labels.csv",
                                       "data.csv_file_column=path", "data.csv_label_column=breed",
                                       "data.csv_split_column=subset", *_overrides(tmp_path / "csv")], tmp_path)
    assert from_csv.returncode == 0, from_csv.stderr[-3000:]
    assert "(csv): 3 classes, 48 train / 15 val images" in from_csv.stdout
    _same_run(tmp_path / "folder", tmp_path / "csv")

    # The same CSV with a column that is not there: one line, the launcher's code, nothing written.
    bad = _launch(TWO_PROCESSES, [f"data.root={images}", "data.source=csv", "data.csv=labels.csv",
                                  *_overrides(tmp_path / "bad")], tmp_path)
    assert bad.returncode != 0
    # torchrun's failure table ends the output; its root cause is the line.
    lines = [line.strip() for line in (bad.stdout + bad.stderr).splitlines() if line.strip("= \n")]
    assert lines[-1].endswith(
        "has no column 'file' (its columns: path, breed, subset); set data.csv_file_column to the right one")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


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
