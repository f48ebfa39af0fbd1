"""Find the images under a data root and split them into train / validation (/ test).

Two layouts are accepted:
  (a) split folders: `train/` (or `Train/`, `training/`), `val/` (or `valid/`, `Validation/`),
      optional `test/`; each holds one folder per class;
  (b) one folder of class folders, split into train/validation by `val_fraction` and `seed`.
The split is stratified and depends only on the sorted relative paths and the seed, never on
the order the file system lists files in. Class names come from the training split, in the order
of `data.class_order` (integer names as numbers, others as text; a recorded order wins).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from configs.errors import UsageError
from data.class_order import class_order

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test", "testing")

Sample = tuple[str, int]  # (path, class index)


@dataclass
class Splits:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[str] = field(default_factory=list)  # unlabelled or labelled, paths only
    layout: str = "split-folders"  # or "class-folders", "train-folder", "csv", "hf"
    # Entries a source left out before the audit (a CSV row naming a missing file, a duplicate):
    # dicts of data.audit.Problem's fields, reported with the audit's own problems.
    source_problems: list[dict] = field(default_factory=list)
    # What finding the images noticed that may not be what the user meant (class folders named like
    # batches of one class), for the start summary.
    warnings: list[str] = field(default_factory=list)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for _, label in getattr(self, split):
            counts[self.classes[label]] += 1
        return counts

    def label_names(self, split: str) -> list[str]:
        """Each sample's class name, in the split's order."""
        return [self.classes[label] for _, label in getattr(self, split)]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by relative path, hidden files and folders
    skipped, symlinked folders not followed (as Path.rglob)."""
    return [Path(path) for path in image_paths(folder)]


def image_paths(folder: str | Path) -> list[str]:
    """`list_images` as strings, for discovery at scale: os.scandir and no pathlib, whose per-path
    parsing took seconds for 100,000 files."""
    found: list[tuple[str, str]] = []  # (relative posix path, path)
    _scan_images(str(folder), "", found)
    found.sort()
    return [path for _, path in found]


def _scan_images(folder: str, prefix: str, found: list[tuple[str, str]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                _scan_images(entry.path, f"{prefix}{entry.name}/", found)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((prefix + entry.name, entry.path))


def _child_named(root: Path, names: tuple[str, ...]) -> Path | None:
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def _class_folders(split_dir: Path) -> dict[str, list[str]]:
    return {d.name: image_paths(d) for d in sorted(split_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


# Archives people point data.root at before unpacking them, and the command that unpacks each (tar
# finds the compression itself).
_TAR = "mkdir -p {folder} && tar -xf {path} -C {folder}"
_ARCHIVES = {".zip": "unzip {path} -d {folder}", ".7z": "7z x {path} -o{folder}", ".rar": "unrar x {path} {folder}/",
             **dict.fromkeys((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"), _TAR)}


def data_root(d) -> Path:
    """data.root, which must be a folder whatever the source (class folders, the CSV's images, a saved
    dataset, shards). The training scripts ask right after reading the config, before the seconds of
    training imports; predict, evaluate and export read configs whose data may live elsewhere."""
    root = Path(d.root).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(not_a_folder(root) if root.exists() else f"data.root does not exist: {root}")
    return root


def not_a_folder(root: Path) -> str:
    """Why data.root `root` (an existing file) cannot be read as a folder, and what to do instead."""
    suffix = next((s for s in sorted(_ARCHIVES, key=len, reverse=True) if root.name.lower().endswith(s)), None)
    if suffix is None:
        return (f"data.root is a file, not a folder: {root}; point it at the folder of images (a CSV goes in "
                f"data.csv with data.source=csv)")
    folder = root.with_name(root.name[:-len(suffix)])
    command = _ARCHIVES[suffix].format(path=root, folder=folder)
    return (f"data.root is a {suffix[1:]} archive, not a folder: {root}; unpack it first ({command}) and point "
            f"data.root at the unpacked folder of class folders")


def _no_class_folders(where: Path) -> str:
    loose = _images_directly_in(where)
    if not loose:
        return (f"no class folders in {where}: expected one folder per class, each holding images "
                f"({where}/CLASS/*.jpg), or train/ and val/ folders of class folders")
    return (f"no class folders in {where}, only {len(loose)} image files directly in it: classes come from "
            f"folder names ({where}/CLASS/*.jpg). If these images are one class, put it beside the other "
            f"classes' folders and point data.root at the folder above ({where.parent}); if a CSV lists their "
            f"labels, use data.source=csv data.csv=FILE (data.csv_file_column, data.csv_label_column)")


def _images_directly_in(folder: Path) -> list[str]:
    """Image files directly in `folder` (not in its sub-folders)."""
    return sorted(e.path for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


# Class folder names that are the parts of one collection rather than classes: a word for a part
# followed by its number (batch1, Batch_02, part-3). Names that are only numbers (digits 0-9) or
# other words with numbers (c0..c9, class_1) are real classes in common datasets, so they do not count.
_PART_NAME = re.compile(r"(batch|part|chunk|shard|subset|set|split|folder|dir|directory|page|vol|volume|"
                        r"group|round|session|day|week|run)[ _\-]?\d+", re.IGNORECASE)


def batch_like_classes(where: Path, names: list[str]) -> list[str]:
    """A warning when every class folder of `where` is named like a part of a collection (_PART_NAME):
    data.root then most likely points at one class's folder, and the run would learn to tell its
    batches apart."""
    if len(names) < 2 or not all(_PART_NAME.fullmatch(n) for n in names):
        return []
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return [f"the class folders of {where} ({shown}) are named like batches or parts of one collection, not "
            f"like classes: training will learn to tell them apart. If {where.name} is one class, point "
            f"data.root at the folder above ({where.parent}), whose sub-folders are the classes (each class "
            f"folder may keep its batch folders: images are found at any depth)"]


def _check_classes(where: Path, folders: dict[str, list[str]], recorded: list[str] | None = None) -> list[str]:
    if not folders:
        raise UsageError(_no_class_folders(where))
    empty = [name for name, files in folders.items() if not files]
    if empty:
        raise UsageError(f"class folder {where / empty[0]} has no images ({len(empty)} empty in all); "
                         f"add images or remove the folder")
    if len(folders) < 2:
        raise UsageError(f"only one class ('{next(iter(folders))}') in {where}: a classifier needs at least two class folders")
    return class_order(folders, recorded)


def _check_not_package(root: Path) -> None:
    # Users habitually keep images in a folder called `data`, which is also this project's package.
    if (root / "__init__.py").is_file() and (root / "folders.py").is_file():
        raise UsageError(f"data.root points at this project's `data` code package ({root}); put images in "
                         f"a folder of their own (e.g. datasets/NAME or ~/datasets/NAME) and point data.root there")


def stratified_split(files_by_class: dict[str, list[str | Path]], classes: list[str], val_fraction: float,
                     seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, shuffle the sorted files with a seeded RNG and cut off `val_fraction` of them."""
    train, val = [], []
    for index, name in enumerate(classes):
        files = sorted(str(p) for p in files_by_class[name])  # POSIX paths: str is as_posix
        random.Random(f"{seed}/{name}").shuffle(files)  # str seeds hash deterministically
        n_val = round(len(files) * val_fraction)
        if len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)  # every class in both splits
        else:
            n_val = 0
        val += [(p, index) for p in files[:n_val]]
        train += [(p, index) for p in files[n_val:]]
    return sorted(train), sorted(val)


def discover(root: str | Path, val_fraction: float = 0.2, seed: int = 0, classes: list[str] | None = None) -> Splits:
    """The splits of an image folder; `classes`: a recorded class order (data.class_order)."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise UsageError(f"data.root does not exist: {root}")
    if not root.is_dir():
        raise UsageError(not_a_folder(root))
    _check_not_package(root)

    train_dir = _child_named(root, TRAIN_NAMES)
    val_dir = _child_named(root, VAL_NAMES)
    test_dir = _child_named(root, TEST_NAMES)
    test = image_paths(test_dir) if test_dir else []

    if train_dir is None:
        if val_dir is not None:
            raise UsageError(f"{root} has {val_dir.name}/ but no train/ folder: add train/ or put class folders directly in the root")
        folders = _class_folders(root)
        order = _check_classes(root, folders, classes)
        train, val = stratified_split(folders, order, val_fraction, seed)
        return Splits(root, order, train, val, test, layout="class-folders",
                      warnings=batch_like_classes(root, order))

    folders = _class_folders(train_dir)
    order = _check_classes(train_dir, folders, classes)
    warnings = batch_like_classes(train_dir, order)
    if val_dir is None:
        train, val = stratified_split(folders, order, val_fraction, seed)
        return Splits(root, order, train, val, test, layout="train-folder", warnings=warnings)
    val_folders = _class_folders(val_dir)
    missing = [c for c in order if c not in val_folders]
    extra = [c for c in val_folders if c not in folders]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from {val_dir.name}/: {', '.join(missing[:5])}; a class without validation "
                         f"images may have an empty folder there ({val_dir.name}/{missing[0]}/)")
        if extra:
            parts.append(f"not in {train_dir.name}/: {', '.join(extra[:5])}")
        raise UsageError(f"class folders differ between {train_dir.name}/ and {val_dir.name}/ ({'; '.join(parts)}); "
                         f"both splits need the same classes")
    train = [(p, i) for i, c in enumerate(order) for p in folders[c]]
    val = [(p, i) for i, c in enumerate(order) for p in val_folders[c]]
    return Splits(root, order, train, val, test, layout="split-folders", warnings=warnings)
