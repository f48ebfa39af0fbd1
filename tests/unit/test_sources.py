"""Data sources: a CSV of file,label rows and Hugging Face datasets on disk become the same Splits
as class folders; what is wrong with a row is reported with its line, what is wrong with the
source is one line of bad input."""

import csv
from pathlib import Path

import pytest

from configs.errors import UsageError
from configs.schema import DataConfig
from data.folders import discover
from data.sources import load_splits
from helpers import make_image_folder


def _write_csv(path: Path, rows, header=("file", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _folder_rows(root: Path):
    return [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.rglob("*.png"))]


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **kw)


def test_csv_gives_the_same_splits_as_the_class_folders(image_folder):
    _write_csv(image_folder / "labels.csv", _folder_rows(image_folder))
    from_csv = load_splits(_cfg(image_folder, source="csv", csv="labels.csv"))
    from_folders = discover(image_folder)
    assert from_csv.classes == from_folders.classes
    assert from_csv.train == from_folders.train and from_csv.val == from_folders.val
    assert from_csv.layout == "csv" and from_csv.source_problems == []


def test_csv_rows_that_cannot_be_used_are_left_out_with_their_line(image_folder):
    rows = _folder_rows(image_folder)
    kaggle_style = (rows[1][0][:-len(".png")], rows[1][1])  # an id without extension finds id.png
    bad = [("red/not_there.png", "red"), rows[0], (rows[2][0], "green"), ("../outside.png", "red"),
           (rows[3][0], "")]
    (image_folder.parent / "outside.png").write_bytes((image_folder / rows[0][0]).read_bytes())
    _write_csv(image_folder / "labels.csv", [rows[0], kaggle_style, rows[2], rows[3], *rows[4:], *bad])
    splits = load_splits(_cfg(image_folder, source="csv", csv="labels.csv"))
    problems = {(p["problem"], p["detail"].split(":")[0]) for p in splits.source_problems}
    last = len(rows) + 1  # the header is line 1
    assert problems == {("missing", f"labels.csv line {last + 1}"), ("duplicate_row", f"labels.csv line {last + 2}"),
                        ("conflicting_labels", "labels.csv line 4"),
                        ("conflicting_labels", f"labels.csv line {last + 3}"),
                        ("outside_root", f"labels.csv line {last + 4}"), ("no_label", f"labels.csv line {last + 5}")}
    used = {Path(p).name for p, _ in splits.train + splits.val}
    assert Path(rows[1][0]).name in used  # found by trying image extensions
    assert Path(rows[0][0]).name in used  # the duplicate row's file stays in, once
    assert Path(rows[2][0]).name not in used and Path(rows[3][0]).name in used  # conflicting; labelled once
    assert len(splits.train) + len(splits.val) == len(rows) - 1


def test_csv_split_column_decides_train_val_test(image_folder):
    rows = _folder_rows(image_folder)
    split_of = ["val" if i % 4 == 0 else "Test" if i % 4 == 1 else "training" for i in range(len(rows))]
    _write_csv(image_folder / "labels.csv", [(f, label, s) for (f, label), s in zip(rows, split_of)],
               header=("path", "class", "subset"))
    splits = load_splits(_cfg(image_folder, source="csv", csv="labels.csv", csv_file_column="path",
                              csv_label_column="class", csv_split_column="subset"))
    assert (len(splits.val), len(splits.test), len(splits.train)) == (9, 9, 18)
    assert all(Path(p).name in {Path(f).name for (f, _), s in zip(rows, split_of) if s == "val"} for p, _ in splits.val)


@pytest.mark.parametrize("header, rows, keys, message", [
    (("file", "breed"), [("red/red_000.png", "red")], {}, "has no column 'label' (its columns: file, breed); "
                                                          "set data.csv_label_column"),
    (("file", "label"), [("red/red_000.png", "red;green")], {},
     "line 2 of labels.csv has several labels ('red;green')"),
    (("file", "label"), [], {}, "has no data rows"),
    (("file", "label", "split"), [("red/red_000.png", "red", "train"), ("green/green_000.png", "green", "train"),
                                  ("blue/blue_000.png", "blue", "val")], {"csv_split_column": "split"},
     "line 4 of labels.csv: label 'blue' is not a class of the training rows (green, red)"),
    (("file", "label", "split"), [("red/red_000.png", "red", "holdout")], {"csv_split_column": "split"},
     "line 2 of labels.csv: split is 'holdout'; use train, val or test"),
    (("file", "label"), [("nothing.png", "red")], {}, "has no usable training rows"),
    (("file", "label"), [("red/red_000.png", "red")], {}, "only one class ('red')"),
])
def test_bad_csv_is_one_line(image_folder, header, rows, keys, message):
    _write_csv(image_folder / "labels.csv", rows, header)
    with pytest.raises(UsageError) as e:
        load_splits(_cfg(image_folder, source="csv", csv="labels.csv", **keys))
    said = str(e.value).replace(f"{image_folder.resolve()}/", "")
    assert message in said and "\n" not in said


def test_csv_needs_its_file(image_folder):
    with pytest.raises(UsageError, match="data.source = 'csv' needs data.csv=FILE"):
        load_splits(_cfg(image_folder, source="csv"))
    with pytest.raises(UsageError, match="data.csv not found"):
        load_splits(_cfg(image_folder, source="csv", csv="nope.csv"))


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets, built here from the tiny image folder (no network)

datasets = pytest.importorskip("datasets")


def _hf_dataset(folder: Path, labels="classlabel"):
    rows = _folder_rows(folder)
    classes = sorted({label for _, label in rows})
    values = [classes.index(label) for _, label in rows] if labels == "classlabel" else [label for _, label in rows]
    label_feature = datasets.ClassLabel(names=classes) if labels == "classlabel" else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict({"image": [str(folder / f) for f, _ in rows], "label": values},
                                      features=features)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGTRAIN_HF_DIR", str(tmp_path / "hf-cache"))


def test_saved_dataset_with_embedded_images_is_written_out_once(image_folder, tmp_path):
    ds = _hf_dataset(image_folder)
    parts = ds.train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
    datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]}).save_to_disk(str(tmp_path / "saved"))
    splits = load_splits(_cfg(tmp_path / "saved", source="hf"))
    assert splits.classes == ["blue", "green", "red"] and (len(splits.train), len(splits.val)) == (27, 9)
    assert splits.root.is_relative_to(tmp_path / "hf-cache") and splits.layout == "hf"
    first = Path(splits.train[0][0])
    assert first.suffix == ".png" and first.read_bytes()[:4] == b"\x89PNG"  # the same encoded bytes
    stamp = first.stat().st_mtime_ns
    assert load_splits(_cfg(tmp_path / "saved", source="hf")).train == splits.train
    assert first.stat().st_mtime_ns == stamp  # the second run reads what the first wrote


def test_parquet_with_string_labels_splits_by_fraction(image_folder, tmp_path):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    _hf_dataset(image_folder, labels="string").to_parquet(str(tmp_path / "pq" / "data" / "train-00000.parquet"))
    splits = load_splits(_cfg(tmp_path / "pq", source="hf", val_fraction=0.25))
    assert splits.classes == ["blue", "green", "red"] and (len(splits.train), len(splits.val)) == (27, 9)


def test_imagefolder_uses_the_files_in_place(image_folder):
    splits = load_splits(_cfg(image_folder, source="hf"))
    assert splits.root == image_folder.resolve()
    assert {Path(p) for p, _ in splits.train + splits.val} == {p.resolve() for p in image_folder.rglob("*.png")}


def test_bad_hf_dataset_is_one_line(image_folder, tmp_path):
    ds = _hf_dataset(image_folder)
    ds.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(UsageError, match=r"has no column 'labels' \(columns: image, label\); set data.hf_label_column"):
        load_splits(_cfg(tmp_path / "one", source="hf", hf_label_column="labels"))
    ds.select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="'train' split of the dataset in .* is empty"):
        load_splits(_cfg(tmp_path / "empty", source="hf"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a readable Hugging Face dataset"):
        load_splits(_cfg(tmp_path / "broken", source="hf"))
