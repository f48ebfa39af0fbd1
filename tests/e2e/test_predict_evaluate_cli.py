"""predict.py and evaluate.py on real checkpoints and image folders, as subprocesses."""

import csv
import json

import pytest
import torch

from helpers import make_image_folder, run_in_process, run_script
from data.transforms import Preprocessing
from models import HeadSpec, build_classifier
from trainer.files.model_file import ClassifierFacts, load_classifier, save_classifier
from trainer.inference.predict import InferenceOptions, predict_files

CLASSES = ["blue", "green", "red"]
ONE_SOURCE = "name one of: a labelled folder, --split val|test, --csv FILE, --hf DIR or --shards DIR"


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    built = build_classifier("tiny_cnn", len(CLASSES))
    path = tmp_path / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), CLASSES,
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config={})
    save_classifier(path, built.model.state_dict(), facts, metrics={"val_acc": 0.5}, epoch=1)
    return path


def test_predict_writes_every_good_row_and_reports_the_bad_file(tmp_path):
    ckpt = _checkpoint(tmp_path)
    folder = make_image_folder(tmp_path / "imgs", per_class=3)
    bad = folder / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    out = tmp_path / "preds.csv"
    result = run_script("predict.py", "--checkpoint", str(ckpt), str(folder), "--out", str(out), "--top-k", "2",
                        "--tta", "--batch-size", "4", "--num-workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10
    good = [r for r in rows if not r["error"]]
    assert len(good) == 9 and all(r["class"] in CLASSES and 0 < float(r["probability"]) <= 1 for r in good)
    assert all(len(r["top2"].split(";")) == 2 for r in good)
    (broken,) = [r for r in rows if r["error"]]
    assert broken["path"] == str(bad) and broken["class"] == ""
    assert "broken.png" in result.stderr and "1 file(s) could not be read" in result.stderr

    # The probabilities are those of the model itself, flip-averaged.
    loaded = load_classifier(ckpt)
    direct = predict_files(loaded, [folder / "blue" / "blue_000.png"], InferenceOptions(num_workers=0, tta_flip=True))
    row = next(r for r in rows if r["path"].endswith("blue_000.png"))
    assert abs(direct.probs[0].max().item() - float(row["probability"])) < 1e-5

    # The Kaggle format in-process: the same entry point, one interpreter start fewer.
    kaggle = tmp_path / "submission.csv"
    result = run_in_process("predict.py", "--checkpoint", str(ckpt), str(folder / "blue"), "--kaggle",
                            "--out", str(kaggle), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = kaggle.read_text().splitlines()
    assert lines[0] == "Id,Class" and lines[1].split(",")[0] == "blue_000"
    assert all(line.split(",")[1] in CLASSES for line in lines[1:])  # by name (tests/unit/test_kaggle_output.py)


def test_predict_refuses_a_missing_input_in_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path)
    # In-process: the error comes before any work; predict.py runs as a subprocess above.
    result = run_in_process("predict.py", "--checkpoint", str(ckpt), str(tmp_path / "nope"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: not a file or folder: {tmp_path / 'nope'}"]


def test_evaluate_numbers_match_the_models_own_predictions(tmp_path):
    ckpt = _checkpoint(tmp_path)
    folder = make_image_folder(tmp_path / "labelled", per_class=4)
    out_dir = tmp_path / "eval"
    result = run_script("evaluate.py", "--checkpoint", str(ckpt), str(folder), "--out-dir", str(out_dir),
                        "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out_dir / "metrics.json").read_text())

    # Hand computation from the model's own predictions.
    loaded = load_classifier(ckpt)
    cm = [[0] * 3 for _ in range(3)]
    for true, name in enumerate(CLASSES):
        for i in range(4):
            image = loaded.preprocessing.load_normalized(folder / name / f"{name}_{i:03d}.png")
            cm[true][loaded.model(image[None]).argmax().item()] += 1
    assert report["confusion_matrix"] == cm
    assert report["accuracy"] == sum(cm[i][i] for i in range(3)) / 12
    for j, name in enumerate(CLASSES):
        predicted = sum(cm[i][j] for i in range(3))
        assert report["per_class"][name]["precision"] == (cm[j][j] / predicted if predicted else 0.0)
        assert report["per_class"][name]["recall"] == cm[j][j] / 4
    assert f"accuracy {report['accuracy']:.4f} on 12 images" in result.stdout
    for png in ("confusion_matrix.png", "top_losses.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_unknown_class_folders(tmp_path):
    ckpt = _checkpoint(tmp_path)
    folder = make_image_folder(tmp_path / "labelled", per_class=1, classes=("red", "purple"))
    # In-process: the error comes before any work; evaluate.py runs as a subprocess above.
    result = run_in_process("evaluate.py", "--checkpoint", str(ckpt), str(folder), cwd=tmp_path)
    assert result.returncode == 2
    assert "purple" in result.stderr and "not classes of this checkpoint" in result.stderr


@pytest.mark.parametrize("args,message", [
    ([], ONE_SOURCE),
    (["{folder}", "--split", "val"], ONE_SOURCE),
    (["--split", "val"], "the checkpoint records no data.root; pass --data-root FOLDER (the run's image folder)"),
    (["--split", "val", "--data-root", "{nope}"], "the run's data root {nope} is not a folder here; pass "
                                                  "--data-root FOLDER where the run's images are now"),
    (["--split", "test", "--data-root", "{folder}"], "the run's data root {folder} has no test/ folder; evaluate "
                                                     "another labelled folder by naming it instead of --split"),
    (["--split", "val", "--data-root", "{other}"], "the classes in {other} (blue, purple) are not the checkpoint's "
                                                   "(blue, green, red); pass --data-root with the run's own image "
                                                   "folder"),
    (["{folder}", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
])
def test_evaluate_bad_input_is_one_line(tmp_path, args, message):
    ckpt = _checkpoint(tmp_path)
    names = {"folder": make_image_folder(tmp_path / "labelled", per_class=2),
             "other": make_image_folder(tmp_path / "other", per_class=2, classes=("blue", "purple")),
             "nope": tmp_path / "nope"}
    args = [a.format(**names) for a in args]
    result = run_in_process("evaluate.py", "--checkpoint", str(ckpt), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message.format(**names)}"]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval-val").exists()


def test_evaluate_split_test_reads_the_data_roots_labelled_test_folder(tmp_path):
    ckpt = _checkpoint(tmp_path)
    root = make_image_folder(tmp_path / "data", per_class=3, layout="split-folders")
    make_image_folder(root / "test", per_class=2, seed=5)
    result = run_in_process("evaluate.py", "--checkpoint", str(ckpt), "--split", "test", "--data-root", str(root),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval-test" / "metrics.json").read_text())
    assert report["images"] == 6 and report["source"] == f"the test split of {root}"
    assert "training images" not in result.stderr
