"""Finding images and splitting them: both layouts, determinism, and the errors users hit."""

import os
import random
import shutil

import pytest

from data.folders import discover
from helpers import REPO, make_image_folder
from configs.errors import UsageError


def test_class_folder_split_is_stratified_and_deterministic(tmp_path):
    root = make_image_folder(tmp_path / "a", per_class=10)
    first = discover(root, val_fraction=0.2, seed=7)
    again = discover(root, val_fraction=0.2, seed=7)
    other_seed = discover(root, val_fraction=0.2, seed=8)
    assert first.layout == "class-folders"
    assert first.classes == ["blue", "green", "red"]
    assert (first.train, first.val) == (again.train, again.val)
    assert first.val != other_seed.val
    assert first.class_counts("val") == {"blue": 2, "green": 2, "red": 2}
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}


def test_split_does_not_depend_on_file_system_order(tmp_path):
    """Same files created in a different order (so listed in a different order) split the same."""
    a = make_image_folder(tmp_path / "a", per_class=9)
    b = tmp_path / "b"
    files = sorted(p for p in a.rglob("*.png"))
    random.Random(3).shuffle(files)
    for path in files:
        target = b / path.relative_to(a)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    rel = lambda split, root: [(os.path.relpath(p, root), y) for p, y in split]  # noqa: E731
    sa, sb = discover(a, 0.3, 1), discover(b, 0.3, 1)
    assert rel(sa.val, a) == rel(sb.val, b)


@pytest.mark.parametrize("train_name, val_name", [("train", "val"), ("Train", "Validation"), ("train", "valid")])
def test_split_folder_layout(tmp_path, train_name, val_name):
    root = make_image_folder(tmp_path / "s", per_class=6, layout="split-folders")
    os.rename(root / "train", root / f"{train_name}_tmp")
    os.rename(root / f"{train_name}_tmp", root / train_name)
    os.rename(root / "val", root / val_name)
    (root / "test").mkdir()
    make_image_folder(tmp_path / "t", per_class=1)
    shutil.copy(next((tmp_path / "t").rglob("*.png")), root / "test" / "unlabelled.png")
    splits = discover(root)
    assert splits.layout == "split-folders"
    assert len(splits.train) == 18 and len(splits.val) == 6 and len(splits.test) == 1


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = make_image_folder(tmp_path / "a", per_class=4)
    (root / "red" / ".DS_Store").write_bytes(b"x")
    (root / "red" / "notes.txt").write_text("hello")
    (root / ".cache").mkdir()
    assert len(discover(root).train) + len(discover(root).val) == 12


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "data.root does not exist"),
    (lambda r: make_image_folder(r, classes=("red",)), "only one class ('red')"),
    (lambda r: (make_image_folder(r), (r / "empty").mkdir()), "class folder {root}/empty has no images"),
    (lambda r: r.mkdir(), "no class folders in {root}"),
])
def test_bad_roots(tmp_path, setup, message):
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(UsageError) as err:
        discover(root)
    assert message.format(root=root) in str(err.value)


def test_class_mismatch_between_splits_names_the_classes(tmp_path):
    root = make_image_folder(tmp_path / "s", per_class=4, layout="split-folders")
    shutil.rmtree(root / "val" / "green")
    with pytest.raises(UsageError, match=r"missing from val/: green"):
        discover(root)


def test_root_pointing_at_the_data_package_is_explained():
    with pytest.raises(UsageError, match="this project's `data` code package"):
        discover(REPO / "data")
