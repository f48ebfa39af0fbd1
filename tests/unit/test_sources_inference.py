"""predict.py and evaluate.py read the same sources training does: a CSV of images (with the run's
column names) and a Hugging Face dataset on disk, in-process through the real entry points."""

import csv
import json

import pytest
import torch

from configs.schema import Config
from data.transforms import Preprocessing
from helpers import make_image_folder, run_in_process
from models import HeadSpec, build_classifier
from trainer.inference.predict import InferenceOptions, predict_files
from trainer.files.model_file import ClassifierFacts, load_classifier, save_classifier

CLASSES = ["blue", "green", "red"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    built = build_classifier("tiny_cnn", len(CLASSES))
    cfg = Config()
    cfg.data.csv_file_column, cfg.data.csv_label_column = "image", "colour"  # the run's own column names
    path = tmp_path / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), CLASSES,
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), cfg.to_dict())
    save_classifier(path, built.model.state_dict(), facts, metrics={"val_acc": 0.5}, epoch=1)
    return path


def _listing(folder, rows):
    with open(folder / "listing.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "colour"))
        writer.writerows(rows)
    return folder / "listing.csv"


def test_evaluate_and_predict_a_csv_in_the_runs_columns(checkpoint, tmp_path):
    folder = make_image_folder(tmp_path / "held_out", per_class=3)
    files = sorted(folder.rglob("*.png"))
    listing = _listing(folder, [(p.relative_to(folder).as_posix(), p.parent.name) for p in files]
                       + [("blue/gone.png", "blue")])
    result = run_in_process("evaluate.py", "--checkpoint", str(checkpoint), "--csv", str(listing),
                            "--out-dir", str(tmp_path / "eval"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 9 and report["source"] == str(listing)
    assert "note: 1 row(s) of" in result.stderr and "gone.png not found" in result.stderr
    result = run_in_process("evaluate.py", "--checkpoint", str(checkpoint), str(folder),
                            "--out-dir", str(tmp_path / "eval-folder"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    by_folder = json.loads((tmp_path / "eval-folder" / "metrics.json").read_text())
    assert report["accuracy"] == by_folder["accuracy"] and report["per_class"] == by_folder["per_class"]

    out = tmp_path / "preds.csv"
    result = run_in_process("predict.py", "--checkpoint", str(checkpoint), "--csv", str(listing), "--out", str(out),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in files]
    direct = predict_files(load_classifier(checkpoint), files, InferenceOptions(num_workers=0))
    assert [r["class"] for r in rows] == [CLASSES[i] for i in direct.probs.argmax(1).tolist()]


def test_a_label_the_checkpoint_does_not_know_is_one_line(checkpoint, tmp_path):
    folder = make_image_folder(tmp_path / "held_out", per_class=1)
    listing = _listing(folder, [("red/red_000.png", "purple")])
    result = run_in_process("evaluate.py", "--checkpoint", str(checkpoint), "--csv", str(listing),
                            "--out-dir", str(tmp_path / "eval"), cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "eval").exists()
    assert result.stderr.strip() == (f"error: label 'purple' of red_000.png in {listing.resolve()} is not a class "
                                     f"of this checkpoint (blue, green, red)")
    result = run_in_process("predict.py", "--checkpoint", str(checkpoint), str(folder), "--csv", str(listing),
                            "--out", str(tmp_path / "p.csv"), cwd=tmp_path)
    assert result.returncode == 2 and "name images or folders, or one of --csv FILE / --hf DIR" in result.stderr


def test_evaluate_and_predict_a_saved_dataset(checkpoint, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("IMGTRAIN_HF_DIR", str(tmp_path / "hf-cache"))
    folder = make_image_folder(tmp_path / "images", per_class=2)
    files = sorted(folder.rglob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    part = datasets.Dataset.from_dict({"image": [str(p) for p in files],
                                       "label": [CLASSES.index(p.parent.name) for p in files]}, features=features)
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "saved"))
    result = run_in_process("evaluate.py", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "saved"),
                            "--out-dir", str(tmp_path / "eval"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["images"] == 6 and report["source"] == f"the 'test' split of {tmp_path / 'saved'}"
    assert {k: v["support"] for k, v in report["per_class"].items()} == dict.fromkeys(CLASSES, 2)
    out = tmp_path / "preds.csv"
    result = run_in_process("predict.py", "--checkpoint", str(checkpoint), "--hf", str(tmp_path / "saved"),
                            "--hf-split", "train", "--out", str(out), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader(out.open()))) == 6
