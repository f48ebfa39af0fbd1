"""predict.py --kaggle: ids as the data gives them, labels by name (numeric labels sort as text:
0, 1, 10, 11, 2, ..., so a class's index is not its name), columns named as the CSV's own, per-class
probabilities in a sample submission's order; what does not fit is refused in one line."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_image, run_in_process
from configs.errors import UsageError
from data.transforms import Preprocessing
from models import HeadSpec, build_classifier
from trainer.files.model_file import ClassifierFacts, save_classifier
from trainer.inference.predict import (FilePredictions, KaggleForm, KaggleSheet, Listing, kaggle_ids, kaggle_rows,
                                       kaggle_sheet)

NUMERIC = sorted(str(i) for i in range(12))  # as a CSV's labels 0-11 sort: 0, 1, 10, 11, 2, 3, ...
TEXT = ["cat", "dog", "fox"]
CSV_COLUMNS = {"data": {"csv_file_column": "image_id", "csv_label_column": "digit"}}


def predictions(class_names: list[str], picks: list[str], failed: dict[int, str] | None = None) -> FilePredictions:
    probs = torch.full((len(picks), len(class_names)), 0.01)
    for row, name in enumerate(picks):
        probs[row, class_names.index(name)] = 0.9
    for row in failed or {}:
        probs[row] = float("nan")
    return FilePredictions([Path(f"img_{i}.png") for i in range(len(picks))], probs, failed or {})


def classifier(class_names: list[str], config: dict | None = None, task: str = "single") -> SimpleNamespace:
    """What kaggle_sheet reads of a LoadedClassifier."""
    return SimpleNamespace(class_names=class_names, metadata={"config": config or {}, "task": task})


@pytest.mark.parametrize("class_names, picks, label, written", [
    (NUMERIC, ["2", "10", "0", "11"], "name", ["2", "10", "0", "11"]),
    (NUMERIC, ["2", "10", "0", "11"], "index", ["4", "2", "0", "3"]),  # the old form, asked for by name
    (TEXT, ["dog", "fox", "cat"], "name", ["dog", "fox", "cat"]),
    (TEXT, ["dog", "fox", "cat"], "index", ["1", "2", "0"]),
])
def test_labels_are_written_by_name_unless_the_index_is_asked_for(class_names, picks, label, written):
    sheet = kaggle_sheet(KaggleForm(label), classifier(class_names), Listing())
    header, rows = kaggle_rows(predictions(class_names, picks), class_names, [f"id{i}" for i in range(len(picks))],
                               sheet)
    assert header == ["Id", "Class"]
    assert [[str(cell) for cell in row] for row in rows] == [[f"id{i}", w] for i, w in enumerate(written)]


def test_a_failed_image_keeps_its_row_with_empty_cells():
    sheet = kaggle_sheet(KaggleForm(probabilities=True), classifier(TEXT), Listing())
    _, rows = kaggle_rows(predictions(TEXT, ["dog", "cat"], {1: "OSError: truncated"}), TEXT, ["a", "b"], sheet)
    assert rows[1] == ["b", "", "", ""]


@pytest.mark.parametrize("form, listing, config, header", [
    (KaggleForm(), Listing(), {}, ["Id", "Class"]),
    (KaggleForm(), Listing(csv="test.csv"), CSV_COLUMNS, ["image_id", "digit"]),
    (KaggleForm(), Listing(csv="test.csv"), {}, ["file", "label"]),  # the run's defaults, which the CSV has
    (KaggleForm(probabilities=True), Listing(), {}, ["Id", *NUMERIC]),
    (KaggleForm(probabilities=True), Listing(csv="test.csv"), CSV_COLUMNS, ["image_id", *NUMERIC]),
])
def test_columns_are_named_as_the_csv_names_them(form, listing, config, header):
    assert kaggle_sheet(form, classifier(NUMERIC, config), listing).header == header


def test_probability_columns_follow_the_sample_submission(tmp_path):
    order = [str(i) for i in range(12)]  # a competition's numeric order, not the checkpoint's text order
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ImageId," + ",".join(order) + "\n1," + ",".join(["0"] * 12) + "\n")
    sheet = kaggle_sheet(KaggleForm(probabilities=True, sample_submission=str(sample)), classifier(NUMERIC),
                         Listing(csv="test.csv"))
    header, rows = kaggle_rows(predictions(NUMERIC, ["2", "11"]), NUMERIC, ["7", "8"], sheet)
    assert header == ["ImageId", *order]
    for row, pick in zip(rows, ["2", "11"]):
        scores = dict(zip(order, map(float, row[1:])))
        assert max(scores, key=scores.get) == pick and scores[pick] == pytest.approx(0.9)
        assert scores["0"] == pytest.approx(0.01)


def test_a_sample_submission_names_the_label_columns(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("\ufeffImageId,Label\n1,0\n")  # Excel's byte-order mark is not part of the name
    sheet = kaggle_sheet(KaggleForm(sample_submission=str(sample)), classifier(NUMERIC), Listing())
    assert sheet == KaggleSheet(["ImageId", "Label"], "name")


@pytest.mark.parametrize("form, header, task, message", [
    (KaggleForm(probabilities=True), "id,cat,dog,wolf,wolf", "single",
     "--sample-submission {sample}: its class columns are not the checkpoint's 3 classes; classes of the checkpoint "
     "it has no column for: fox; columns that are no class of the checkpoint: wolf; columns named twice: wolf"),
    (KaggleForm(), "id,cat,dog,fox", "single",
     "--sample-submission {sample} has 3 columns after its id (cat, dog, fox): one per class; write them with "
     "--kaggle-probabilities"),
    (KaggleForm(probabilities=True), "id", "single",
     "--sample-submission {sample}: its header (id) needs an id column and named columns after it"),
    (KaggleForm(), "id,label", "multilabel",
     "--kaggle writes one class per image; this checkpoint is multi-label: write one score column per class with "
     "--kaggle-probabilities (the default CSV has a labels column)"),
])
def test_what_does_not_fit_is_refused_in_one_line(tmp_path, form, header, task, message):
    sample = tmp_path / "sample.csv"
    sample.write_text(header + "\n")
    form = KaggleForm(form.label, form.probabilities, str(sample))
    with pytest.raises(UsageError) as e:
        kaggle_sheet(form, classifier(TEXT, task=task), Listing())
    assert str(e.value) == message.format(sample=sample)


def test_a_multilabel_checkpoint_writes_its_scores_per_class():
    sheet = kaggle_sheet(KaggleForm(probabilities=True), classifier(TEXT, task="multilabel"), Listing())
    assert sheet.header == ["Id", *TEXT] and sheet.columns == [0, 1, 2]


def test_ids_are_the_csvs_cells_as_written_else_file_stems(tmp_path):
    images = tmp_path / "test"
    images.mkdir()
    (tmp_path / "test.csv").write_text("image_id\nab12\ncd34.png\nsub/ef56\n")
    paths = [images / "ab12.jpg", images / "cd34.png", images / "sub" / "ef56.png"]
    loaded = classifier(TEXT, CSV_COLUMNS)
    listing = Listing(csv=str(tmp_path / "test.csv"), data_root=str(images))
    assert kaggle_ids(paths, loaded, listing) == ["ab12", "cd34.png", "sub/ef56"]
    assert kaggle_ids(paths, loaded, Listing()) == ["ab12", "cd34", "ef56"]
    shard_refs = [Path(f"{tmp_path}/shards/val-000000.tar#{i:08d}") for i in range(2)]
    assert kaggle_ids(shard_refs, loaded, Listing(shards=str(tmp_path / "shards"))) == ["00000000", "00000001"]


def test_predict_writes_a_submission_kaggle_reads_right(tmp_path):
    """A checkpoint of the labels 0-11 whose head always says "2" (index 4 in the sorted class list):
    predict.py writes 2 by name, 4 only when the index is asked for."""
    torch.manual_seed(0)
    built = build_classifier("tiny_cnn", len(NUMERIC))
    state = built.model.state_dict()
    state[f"{built.head_name}.bias"][NUMERIC.index("2")] += 100.0
    checkpoint = tmp_path / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), NUMERIC,
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config=CSV_COLUMNS)
    save_classifier(checkpoint, state, facts, metrics={"val_acc": 0.5}, epoch=1)
    rng = np.random.default_rng(0)
    (tmp_path / "test").mkdir()
    for name in ("a1", "b2", "c3"):
        make_image(rng, 0).save(tmp_path / "test" / f"{name}.png")
    (tmp_path / "test.csv").write_text("image_id\na1\nb2\nc3\n")  # Kaggle's ids, without extensions
    common = ["--checkpoint", str(checkpoint), "--csv", str(tmp_path / "test.csv"), "--data-root",
              str(tmp_path / "test"), "--num-workers", "0"]

    result = run_in_process("predict.py", *common, "--kaggle", "--out", "submission", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: --out submission has no extension: wrote submission.csv" in result.stdout
    assert (tmp_path / "submission.csv").read_text() == "image_id,digit\na1,2\nb2,2\nc3,2\n"

    result = run_in_process("predict.py", *common, "--kaggle", "--kaggle-label", "index", "--out", "old.csv",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "old.csv").read_text() == "image_id,digit\na1,4\nb2,4\nc3,4\n"

    sample = tmp_path / "sample_submission.csv"
    sample.write_text("image_id," + ",".join(str(i) for i in range(12)) + "\n")
    result = run_in_process("predict.py", *common, "--kaggle-probabilities", "--sample-submission", str(sample),
                            "--out", "probs.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "probs.csv").open()))
    assert [r["image_id"] for r in rows] == ["a1", "b2", "c3"]
    assert all(max(map(str, range(12)), key=lambda c: float(r[c])) == "2" for r in rows)


@pytest.mark.parametrize("args, line", [
    (["--kaggle-label", "index"], "--kaggle-label shapes a Kaggle submission: add --kaggle (or "
                                  "--kaggle-probabilities)"),
    (["--sample-submission", "s.csv"], "--sample-submission shapes a Kaggle submission: add --kaggle"),
    (["--kaggle-probabilities", "--kaggle-label", "name"], "--kaggle-label goes with --kaggle (one label per image), "
                                                           "not with --kaggle-probabilities"),
])
def test_kaggle_flags_without_kaggle_are_refused_before_any_work(tmp_path, args, line):
    result = run_in_process("predict.py", "--checkpoint", "missing.safetensors", "a.jpg", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {line}")
    assert list(tmp_path.iterdir()) == []
