"""Multi-label data (`data.task = "multilabel"`): a folder of images plus a CSV of their classes.

    file,labels
    img_001.png,red;blue
    sub/img_002.jpg,green

File paths are relative to data.root; labels are class names separated by ';'. The classes are
the sorted names the CSV uses. `read_labels_csv` is the one reader of such a file, so another CSV
source can reuse it; every problem in it is one line naming the CSV line.

The validation split is stratified by each image's first listed label, with data.seed, through
the same `stratified_split` class folders use: a class that comes first on two images or more is
in both splits. Samples keep that first label as their int label (the audit, the class-folder
tools and the split see one class per image); `MultiLabelSplits.label_sets` holds every label,
and `targets` turns samples into the multi-hot vectors training sees.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs.errors import UsageError
from data.folders import Sample, Splits, stratified_split

SEPARATOR = ";"
COLUMNS = ("file", "labels")


@dataclass(frozen=True)
class LabelRow:
    line: int  # line in the CSV file (the header is line 1)
    path: Path  # resolved
    labels: tuple[str, ...]  # as listed, duplicates dropped


def read_labels_csv(csv_path: str | Path, root: str | Path, known: list[str] | None = None) -> list[LabelRow]:
    """Every row of a `file,labels` CSV, checked: the file exists under `root`, it is listed once,
    it has at least one label, and (with `known`) every label is one of those classes."""
    csv_path, root = Path(csv_path).expanduser(), Path(root).expanduser().resolve()
    if not csv_path.is_file():
        raise UsageError(f"labels CSV not found: {csv_path} (data.labels_csv; columns {','.join(COLUMNS)}, "
                         f"e.g. 'img_001.png,red;blue')")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{csv_path} is not a UTF-8 text CSV (columns {','.join(COLUMNS)})") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UsageError(f"{csv_path} line 1: no column {missing[0]!r} (header {','.join(reader.fieldnames or [])!r}; "
                         f"expected {','.join(COLUMNS)})")
    rows, first_line = [], {}
    for row in reader:
        line = reader.line_num
        where = f"{csv_path} line {line}"
        name = (row["file"] or "").strip()
        if not name:
            raise UsageError(f"{where}: empty file name")
        path = (root / name).resolve()
        if not path.is_file():
            raise UsageError(f"{where}: file {name} does not exist under {root}")
        if path in first_line:
            raise UsageError(f"{where}: {name} is listed again (first on line {first_line[path]}); list each file once")
        first_line[path] = line
        labels = tuple(dict.fromkeys(p.strip() for p in (row["labels"] or "").split(SEPARATOR) if p.strip()))
        if not labels:
            raise UsageError(f"{where}: {name} has no labels; give at least one class name, several separated "
                             f"by '{SEPARATOR}'")
        unknown = [label for label in labels if known is not None and label not in known]
        if unknown:
            raise UsageError(f"{where}: unknown class {unknown[0]!r} for {name} (classes: {', '.join(known[:10])}"
                             f"{'...' if len(known) > 10 else ''})")
        rows.append(LabelRow(line, path, labels))
    if not rows:
        raise UsageError(f"{csv_path} lists no images (expected rows like 'img_001.png,red;blue')")
    return rows


@dataclass
class MultiLabelSplits(Splits):
    """Splits whose samples carry their first label; `label_sets` maps each path to all its labels."""

    label_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Images of each class (an image counts once for every label it has)."""
        counts = dict.fromkeys(self.classes, 0)
        for path, _ in getattr(self, split):
            for label in self.label_sets[path]:
                counts[self.classes[label]] += 1
        return counts

    def targets(self, samples: list[Sample]) -> list[tuple[str, torch.Tensor]]:
        """(path, multi-hot float vector) for each sample: what BCEWithLogitsLoss compares with."""
        return [(path, multi_hot(self.label_sets[path], len(self.classes))) for path, _ in samples]


def multi_hot(labels, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes)
    target[list(labels)] = 1.0
    return target


def labels_csv_path(root: str | Path, labels_csv: str) -> Path:
    """data.labels_csv: an absolute path, or one relative to data.root."""
    path = Path(labels_csv).expanduser()
    return path if path.is_absolute() else Path(root).expanduser() / path


def discover_multilabel(root: str | Path, labels_csv: str, val_fraction: float = 0.2,
                        seed: int = 0) -> MultiLabelSplits:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"data.root is not a folder: {root}")
    rows = read_labels_csv(labels_csv_path(root, labels_csv), root)
    classes = sorted({label for row in rows for label in row.labels})
    index = {name: i for i, name in enumerate(classes)}
    by_first: dict[str, list[Path]] = defaultdict(list)
    for row in rows:
        by_first[row.labels[0]].append(row.path)
    train, val = stratified_split({c: by_first.get(c, []) for c in classes}, classes, val_fraction, seed)
    label_sets = {str(row.path): tuple(sorted(index[name] for name in row.labels)) for row in rows}
    splits = MultiLabelSplits(root, classes, train, val, [], "labels-csv", label_sets)
    absent = [c for c, n in splits.class_counts("train").items() if n == 0]
    if absent:
        raise UsageError(f"class {absent[0]!r} of {labels_csv_path(root, labels_csv)} is on no training image "
                         f"after the split ({len(absent)} such); label more images with it or change data.seed")
    return splits
