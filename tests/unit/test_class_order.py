"""One class-order rule for every source (data.class_order): integer names sort as numbers, other
names as text, a recorded order wins. The same labels 0-11 from a folder, a CSV, a Hugging Face
dataset (string labels, or a ClassLabel listing them as text sorts them) and tar shards (written
in the old text order) get the same class list and the same label per image."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, default_collate

from configs.schema import DataConfig
from data.class_order import class_order
from data.dataset import ImageListDataset
from data.folders import discover
from data.shards import ShardMembers, ShardOrder, ShardStream, read_index, write_shards
from data.sources import load_splits, open_source
from helpers import make_image_folder

NUMERIC = [str(i) for i in range(12)]
AS_TEXT = sorted(NUMERIC)  # 0, 1, 10, 11, 2, ...: how folders and CSVs were ordered before the rule


@pytest.mark.parametrize("names, recorded, order", [
    (["10", "2", "1", "0", "11"], None, ["0", "1", "2", "10", "11"]),
    (["3", "-1", "20"], None, ["-1", "3", "20"]),
    (["b", "a", "B", "10"], None, ["10", "B", "a", "b"]),  # one non-integer: all as text
    (["class10", "class2", "class1"], None, ["class1", "class10", "class2"]),
    (["7", "07", "007"], None, ["007", "07", "7"]),  # equal numbers: the text decides
    (["1.5", "2"], None, ["1.5", "2"]),  # not integers
    (["²", "1"], None, ["1", "²"]),  # not ASCII digits
    (["1", "2", "10"], ["1", "10", "2"], ["1", "10", "2"]),  # a recorded order wins
    (["1", "2", "10"], ["1", "2"], ["1", "2", "10"]),  # unless it holds other names
    (["1", "2", "10", "2"], None, ["1", "2", "10"]),  # repeats count once
])
def test_the_rule(names, recorded, order):
    assert class_order(names, recorded) == order


@pytest.fixture(scope="module")
def numeric_folder(tmp_path_factory):
    """Twelve classes named 0..11, four 8x8 images each."""
    root = tmp_path_factory.mktemp("numeric")
    return make_image_folder(root / "images", per_class=4, classes=tuple(NUMERIC), size=8)


def _by_file(splits, split="train") -> dict[str, str]:
    """File name -> class name: which images a split holds, and under which class."""
    return {Path(p).name: splits.classes[label] for p, label in getattr(splits, split)}


def test_a_folder_a_csv_and_a_dataset_give_the_same_class_order(numeric_folder, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("IMGTRAIN_HF_DIR", str(tmp_path / "hf-cache"))
    folder = discover(numeric_folder)
    assert folder.classes == NUMERIC

    files = sorted(numeric_folder.rglob("*.png"))
    with open(numeric_folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *((p.relative_to(numeric_folder).as_posix(), p.parent.name)
                                                      for p in files)])
    from_csv = load_splits(DataConfig(root=str(numeric_folder), source="csv", csv="labels.csv"))

    # String labels, and a ClassLabel whose names are in text order (as datasets' imagefolder makes them).
    label_column = {"strings": (datasets.Value("string"), [p.parent.name for p in files]),
                    "classlabel": (datasets.ClassLabel(names=AS_TEXT), [AS_TEXT.index(p.parent.name) for p in files])}
    from_hf = {}
    for kind, (feature, values) in label_column.items():
        features = datasets.Features({"image": datasets.Image(), "label": feature})
        part = datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": values}, features=features)
        part.save_to_disk(str(tmp_path / kind))
        from_hf[kind] = load_splits(DataConfig(root=str(tmp_path / kind), source="hf"))

    truth = {p.name: p.parent.name for p in files}
    # A dataset's images are written out as <row>.png: the row is the file's place in `files`.
    hf_name = {f"{i:08d}.png": p.name for i, p in enumerate(files)}
    for splits, name_of in ((folder, {}), (from_csv, {}), (from_hf["strings"], hf_name),
                            (from_hf["classlabel"], hf_name)):
        assert splits.classes == NUMERIC
        samples = splits.train + splits.val
        assert len(samples) == len(files)
        assert all(label == NUMERIC.index(truth[name_of.get(Path(p).name, Path(p).name)]) for p, label in samples)
    assert from_csv.train == folder.train and from_csv.val == folder.val


def test_shards_written_in_another_order_are_read_in_the_rule_s_order(numeric_folder, tmp_path):
    # Shards as the code before the rule wrote them: classes in text order, labels indices into it.
    old = discover(numeric_folder, classes=AS_TEXT)
    assert old.classes == AS_TEXT
    write_shards(old, tmp_path / "shards", 2000, (), {"source": "folder"}, say=lambda _: None)
    folder = discover(numeric_folder)
    source = open_source(DataConfig(root=str(tmp_path / "shards"), source="shards"))
    index = source.index()
    assert source.classes == NUMERIC and read_index(tmp_path / "shards").classes == AS_TEXT
    # Each shard sample is its source image: the same bytes; its label is that image's in the folder's order.
    members = ShardMembers(index)
    by_bytes = {Path(p).read_bytes(): label for p, label in folder.train + folder.val}
    for split in ("train", "val"):
        assert [label for _, label in index.samples(split)] == [by_bytes[members.read(ref)]
                                                               for ref, _ in index.samples(split)]
    # The training stream renumbers the labels written in the tars (KEY.cls) the same way.
    order = ShardOrder([s["samples"] for s in index.shards("train")], 4, 0, 0, 1, 0, 1)
    order.start_epoch(1)
    images = ImageListDataset(index.samples("train"), ShardMembers(index, _Bytes()), None, 0)
    streamed = [(image, label) for images_, labels, _ in DataLoader(ShardStream(index, order, images, _collate),
                                                                   batch_size=None, collate_fn=lambda b: b)
                for image, label in zip(images_, labels.tolist())]
    assert len(streamed) == len(folder.train)
    assert all(by_bytes[image] == label for image, label in streamed)
    # A recorded order (a resumed run of those old shards) wins.
    assert open_source(source.d, AS_TEXT).classes == AS_TEXT
    assert open_source(source.d, AS_TEXT).index().label_map is None


class _Bytes:
    """A 'decoder' that hands back the sample's bytes."""

    def load(self, fileobj, max_pixels):
        return fileobj.read()


def _collate(samples):
    images, labels = zip(*samples)
    return list(images), default_collate(list(labels))


def test_a_recorded_order_wins_for_every_file_source(numeric_folder, tmp_path):
    files = sorted(numeric_folder.rglob("*.png"))
    with open(numeric_folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *((p.relative_to(numeric_folder).as_posix(), p.parent.name)
                                                      for p in files)])
    folder_cfg = DataConfig(root=str(numeric_folder))
    for d in (folder_cfg, dataclasses.replace(folder_cfg, source="csv", csv="labels.csv")):
        now, recorded = load_splits(d), load_splits(d, AS_TEXT)
        assert now.classes == NUMERIC and recorded.classes == AS_TEXT
        # The same images in each split (the split never depends on the order), each under its own class name.
        assert _by_file(recorded) == _by_file(now) and _by_file(recorded, "val") == _by_file(now, "val")
