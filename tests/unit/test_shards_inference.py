"""predict and evaluate on tar shards, in-process: a split's samples as `SHARD.tar#KEY` references
with their class names, read through the checkpoint's eval transform into exactly the files'
probabilities; only the split read is hashed; bad input (a damaged shard, a label outside the
class list, other classes, a test split) is one line; the same classes in another order are
mapped by name."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from configs.errors import UsageError
from configs.schema import Config, DataConfig
from data.folders import discover
from data.shards import read_index, write_shards
from data.sources import listed_images, load_splits
from data.transforms import Preprocessing
from helpers import make_image_folder, run_in_process
from models import HeadSpec, build_classifier
from trainer.inference.evaluate import labelled_listed, refuse_other_classes
from trainer.inference.predict import InferenceOptions, predict_files, training_images_among
from trainer.files.model_file import ClassifierFacts, load_classifier, save_classifier

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """30 images in shards of ~4 KB: 24 training samples, 6 validation."""
    root = tmp_path_factory.mktemp("shards")
    splits = discover(make_image_folder(root / "images", per_class=10), 0.2, 0)
    write_shards(splits, root / "shards", 4000, ([0.5] * 3, [0.25] * 3), {"source": "folder"}, say=lambda _: None)
    return root / "shards", splits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    built = build_classifier("tiny_cnn", len(CLASSES))
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    facts = ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), CLASSES,
                            Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3), Config().to_dict())
    save_classifier(path, built.model.state_dict(), facts, metrics={}, epoch=1)
    return path


def shards_config(root) -> DataConfig:
    return DataConfig(root=str(root), source="shards")


def test_a_split_is_listed_as_references_with_class_names(shards):
    root, splits = shards
    listed = listed_images(shards_config(root))  # default: val
    index = read_index(root)
    assert listed.store.index.root == index.root and listed.source == f"the val shards of {index.root}"
    assert [str(p) for p in listed.paths] == [ref for ref, _ in index.samples("val")]
    assert str(listed.paths[0]) == f"{index.root}/val-000000.tar#00000000"
    assert listed.labels == [CLASSES[label] for _, label in splits.val]
    assert len(listed_images(shards_config(root), "train").paths) == len(splits.train) == 24
    # Every source becomes the same Splits: the shards' are the index's references.
    assert load_splits(shards_config(root)).val == index.samples("val")


def test_predictions_from_the_tars_are_those_from_the_files(shards, checkpoint):
    root, splits = shards
    loaded = load_classifier(checkpoint)
    listed = listed_images(shards_config(root))
    options = InferenceOptions(num_workers=0)
    from_tars = predict_files(loaded, listed.paths, options, store=listed.store)
    from_files = predict_files(loaded, [p for p, _ in splits.val], options)
    assert not from_tars.errors and torch.equal(from_tars.probs, from_files.probs)
    files = labelled_listed(listed, CLASSES, multilabel=False)
    assert files.labels == [label for _, label in splits.val] and files.store is listed.store
    # A checkpoint with the same classes in another order: labels go by name.
    reordered = labelled_listed(listed, CLASSES[::-1], multilabel=False)
    assert reordered.labels == [2 - label for _, label in splits.val]


def test_only_the_split_that_is_read_is_hashed(shards, tmp_path):
    root, _ = shards
    copy = shutil.copytree(root, tmp_path / "copy")
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert len(listed_images(shards_config(copy), "val").paths) == 6  # training shards are not read
    with pytest.raises(UsageError, match=r"^\S+/train-000001.tar is damaged: its sha256 differs from index.json's"):
        listed_images(shards_config(copy), "train")


def test_shards_have_no_test_split(shards):
    root, _ = shards
    with pytest.raises(UsageError) as e:
        listed_images(shards_config(root), "test")
    assert str(e.value) == (f"{read_index(root).root} holds train and val shards only (launch/make_shards.py writes "
                            f"no test split): evaluate test images by naming their folder, or with --csv FILE or "
                            f"--hf DIR")


@pytest.mark.parametrize("change, message", [
    (lambda s: s["labels"].__setitem__(1, 3), "val-000000.tar: the label of sample 1 is 3, not one of the 3 classes' "
                                              "indices"),
    (lambda s: s["labels"].__setitem__(0, -1), "the label of sample 0 is -1"),
    (lambda s: s["offsets"].pop(), "val-000000.tar lists 2 samples but 2 labels, 1 offsets and 2 sizes"),
])
def test_an_index_whose_labels_are_not_classes_is_refused(shards, tmp_path, change, message):
    root, _ = shards
    copy = shutil.copytree(root, tmp_path / "copy")
    raw = json.loads((copy / "index.json").read_text())
    change(raw["splits"]["val"]["shards"][0])
    (copy / "index.json").write_text(json.dumps(raw))
    with pytest.raises(UsageError, match="index.json is not a readable shards index") as e:
        read_index(copy)
    assert message in str(e.value)


@pytest.mark.parametrize("theirs, differ", [
    (["blue", "green", "purple"], "not in the checkpoint: purple; not in these: red"),
    (["blue", "green", "red", "cyan"], "not in the checkpoint: cyan"),
    (["blue", "green"], "not in these: red"),
])
def test_other_classes_are_refused_naming_the_difference(theirs, differ):
    with pytest.raises(UsageError) as e:
        refuse_other_classes(theirs, CLASSES, "the val shards of X")
    assert str(e.value) == (f"the classes of the val shards of X are not the checkpoint's ({differ}); evaluate them "
                            f"with a checkpoint of these classes")
    refuse_other_classes(CLASSES, CLASSES, "X")  # the same list passes
    refuse_other_classes(CLASSES[::-1], CLASSES, "X")  # and in another order: labels go by name


def test_a_multilabel_checkpoint_is_not_evaluated_on_shards(shards):
    multilabel = dataclasses.replace(shards_config(shards[0]), task="multilabel")
    with pytest.raises(UsageError, match="shards record one class per image"):
        listed_images(multilabel)
    assert len(listed_images(multilabel, labelled=False).paths) == 6  # predict needs no labels


def test_training_images_are_found_across_files_and_shards(shards):
    root, splits = shards
    folder_run = Config()
    folder_run.data = dataclasses.replace(folder_run.data, root=str(splits.root), val_fraction=0.2, audit="off")
    shards_run = Config()
    shards_run.data = shards_config(root)
    train, val = (listed_images(shards_config(root), split) for split in ("train", "val"))
    # A folder run, shard samples of its own images; a shards run, the files it was written from.
    assert training_images_among(train.paths, folder_run, train.store) == 24
    assert training_images_among(val.paths, folder_run, val.store) == 0
    assert training_images_among([Path(p) for p, _ in splits.train], shards_run) == 24
    assert training_images_among([Path(p) for p, _ in splits.val], shards_run) == 0
    assert training_images_among(train.paths, shards_run, train.store) == 24  # its own samples: no hashing


@pytest.mark.parametrize("script, args, line", [
    ("predict.py", ["--shards-split", "train", "{images}"], "--shards-split train is a split of --shards DIR: name "
                                                             "the folder too"),
    ("evaluate.py", ["--shards", "{shards}", "--csv", "x.csv"], "name one of: a labelled folder, --split val|test, "
                                                                "--csv FILE, --hf DIR or --shards DIR"),
    ("predict.py", ["--shards", "{shards}", "{images}"], "name images or folders, or one of --csv FILE / --hf DIR / "
                                                         "--shards DIR"),
])
def test_shards_arguments_that_do_not_fit_are_one_line(shards, checkpoint, tmp_path, script, args, line):
    root, splits = shards
    args = [a.format(shards=root, images=splits.root) for a in args]
    result = run_in_process(script, "--checkpoint", str(checkpoint), *args, "--out" if script == "predict.py" else
                            "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {line}"]
    assert not (tmp_path / "out").exists()
