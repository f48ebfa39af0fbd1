"""data.source = "csv": `data.csv` lists one image per row, paths relative to `data.root` (Kaggle's
`train/` + `labels.csv`). Rows that cannot be used (missing file, duplicate, the same file under
two labels, a path outside data.root, no label) are left out and reported by the audit with their
line numbers; a missing column, a label that is not a class, several labels in one row (unless
data.task = multilabel: ';'-separated) or no usable row at all is bad input. With
data.csv_split_column the rows say their split (train, val, test); without it, the labelled rows
are split by data.val_fraction.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from configs.errors import UsageError
from data.class_order import class_order
from data.folders import IMAGE_EXTENSIONS, Splits, data_root, stratified_split
from data.multilabel import SEPARATOR, MultiLabelSplits
from data.sources.base import SPLIT_NAMES, ListedImages, Source, by_fraction, register

# Extensions tried, in order, for a CSV file name without one (Kaggle's `id` columns).
_TRY_EXTENSIONS = (".jpg", ".jpeg", ".png", *sorted(IMAGE_EXTENSIONS - {".jpg", ".jpeg", ".png"}))
ROW_LEFT_OUT = "row left out"  # the row, not the file: a duplicate row's file stays in by its first row


@register("csv")
class CsvSource(Source):
    def _load(self) -> Splits:
        return csv_splits(self.d, self.recorded)

    def listed(self, split: str | None = None, labelled: bool = True) -> ListedImages:
        """Every usable row (of `split` only, with a split column). `labelled=False` (predict): the
        CSV needs no label column."""
        d = self.d
        path = csv_path(d)
        rows = read_csv_rows(path, d.csv_file_column, d.csv_label_column if labelled else "", d.csv_split_column)
        kept, problems = _usable_rows(rows, data_root(d), path, d.task == "multilabel", labels_needed=False)
        kept = [(r, p) for r, p in kept if split is None or not d.csv_split_column or r.split == split]
        where = f"{path}" + (f" ({split} rows)" if split and d.csv_split_column else "")
        return ListedImages([Path(p) for _, p in kept], [r.label for r, _ in kept], where, problems)

    def submission_columns(self) -> tuple[str, str]:
        return self.d.csv_file_column, self.d.csv_label_column

    def submission_ids(self, paths: list[Path]) -> list[str]:
        """Each image's row's file cell as written: Kaggle's test CSVs give ids without an extension
        (found as files by trying each image extension), which the submission must give back."""
        written = {row.file for row in read_csv_rows(csv_path(self.d), self.d.csv_file_column, "")}
        ids = []
        for path in paths:
            relative = os.path.relpath(path, self.root)
            bare = os.path.splitext(relative)[0]
            ids.append(bare if relative not in written and bare in written else relative)
        return ids

    @classmethod
    def reads(cls, d) -> list[Path]:
        root = Path(d.root).expanduser().resolve()
        if not d.csv:
            return [root]
        path = Path(d.csv).expanduser()  # as csv_path resolves it, without its refusals
        return [root, (path if path.is_absolute() else root / path).resolve()]

    def _test_split(self) -> ListedImages:
        if not self.d.csv_split_column:
            raise UsageError("the run's CSV has no split column, so no test rows; evaluate another CSV with --csv")
        return self.listed("test")

    @classmethod
    def description(cls, data: dict, layout: str) -> str:
        root = f"`data.root` = `{data.get('root', '?')}`"
        split_column = data.get("csv_split_column")
        how = (f"validation: the rows its `{split_column}` column marks val" if split_column
               else f"validation: {by_fraction(data)}")
        return f"Images listed in a CSV (`data.csv` = `{data.get('csv')}`, paths under {root}); {how}"

    @classmethod
    def listing_config(cls, d, path: str, root: str | None):
        """--csv FILE: its paths are relative to `root` (--data-root), else to the CSV's folder; every
        row is listed."""
        csv_file = Path(path).expanduser().resolve()
        root = Path(root).expanduser() if root else csv_file.parent
        return dataclasses.replace(d, source="csv", csv=str(csv_file), csv_split_column="", root=str(root))


class CsvRow(NamedTuple):  # a tuple, not a dataclass: 100,000 of them are made per start
    line: int  # in the file, the header being line 1
    file: str  # as written
    label: str
    split: str  # train, val, test, or "" without a split column


def csv_path(d) -> Path:
    if not d.csv:
        raise UsageError("data.source = 'csv' needs data.csv=FILE (a CSV with a file and a label column)")
    path = Path(d.csv).expanduser()
    path = path if path.is_absolute() else data_root(d) / path
    if not path.is_file():
        raise UsageError(f"data.csv not found: {path}")
    return path


def read_csv_rows(path: Path, file_column: str, label_column: str, split_column: str = "") -> list[CsvRow]:
    """Every data row of the CSV; a missing column or a bad split value is bad input."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.reader(f)
            columns = next(reader, [])
            for key, column in (("csv_file_column", file_column), ("csv_label_column", label_column),
                                ("csv_split_column", split_column)):
                if column and column not in columns:
                    raise UsageError(f"{path} has no column {column!r} (its columns: {', '.join(columns) or 'none'}); "
                                     f"set data.{key} to the right one")
            width = len(columns)
            at_file, at_label, at_split = (columns.index(c) if c else -1 for c in (file_column, label_column,
                                                                                    split_column))
            rows = []
            for record in reader:
                if not record:  # a blank line, as csv.DictReader skips it
                    continue
                if len(record) < width:  # a short row's missing cells read as empty, as with csv.DictReader
                    record += [""] * (width - len(record))
                record.append("")  # cell -1: what a column that is not asked for reads
                split = ""
                if split_column:
                    raw = record[at_split].strip()
                    split = SPLIT_NAMES.get(raw.lower(), "")
                    if not split:
                        raise UsageError(f"line {reader.line_num} of {path}: {split_column} is {raw!r}; use "
                                         f"train, val or test")
                rows.append(CsvRow(reader.line_num, record[at_file].strip(), record[at_label].strip(), split))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not a UTF-8 text CSV ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable CSV ({e})") from None
    return rows


def label_names(label: str, multilabel: bool) -> tuple[str, ...]:
    """A row's class names: the label itself, or (multi-label) its ';'-separated names in order,
    blanks and repeats dropped."""
    if not multilabel:
        return (label,) if label else ()
    return tuple(dict.fromkeys(n.strip() for n in label.split(SEPARATOR) if n.strip()))


def csv_splits(d, recorded: list[str] | None = None) -> Splits:
    """The CSV source's splits; with data.task = multilabel, MultiLabelSplits whose samples carry
    their first listed label (what the split is stratified by) and `label_sets` all of them.
    `recorded`: a recorded class order (data.class_order)."""
    root, path = data_root(d), csv_path(d)
    rows = read_csv_rows(path, d.csv_file_column, d.csv_label_column, d.csv_split_column)
    if not rows:
        raise UsageError(f"{path} has no data rows: it needs a header and one row per image")
    multilabel = d.task == "multilabel"
    several = next((r for r in rows if SEPARATOR in r.label), None)
    if several and not multilabel:
        raise UsageError(f"line {several.line} of {path} has several labels ({several.label!r}): multi-label "
                         f"images need data.task=multilabel; with one class per image give each row one label")
    kept, problems = _usable_rows(rows, root, path, multilabel)
    labelled = [(r, p, label_names(r.label, multilabel)) for r, p in kept if r.split != "test"]
    train_rows = [row for row in labelled if row[0].split in ("", "train")]
    classes = _csv_classes(path, rows, problems, labelled, train_rows, recorded)
    index = {c: i for i, c in enumerate(classes)}
    test = sorted(p for r, p in kept if r.split == "test")
    if d.csv_split_column:
        train = sorted((p, index[names[0]]) for _, p, names in train_rows)
        val = sorted((p, index[names[0]]) for r, p, names in labelled if r.split == "val")
        if not val:
            raise UsageError(f"{path} has no usable val rows in its {d.csv_split_column!r} column; mark some "
                             f"rows val, or leave data.csv_split_column empty to split by data.val_fraction")
    else:
        by_class: dict[str, list[str]] = defaultdict(list)
        for _, p, names in train_rows:
            by_class[names[0]].append(p)
        train, val = stratified_split({c: by_class.get(c, []) for c in classes}, classes, d.val_fraction, d.seed)
    if not multilabel:
        return Splits(root, classes, train, val, test, layout="csv", source_problems=problems)
    label_sets = {p: tuple(sorted(index[n] for n in names)) for _, p, names in labelled}
    splits = MultiLabelSplits(root, classes, train, val, test, "csv", problems, label_sets=label_sets)
    absent = [c for c, n in splits.class_counts("train").items() if n == 0]
    if absent:
        raise UsageError(f"class {absent[0]!r} of {path} is on no training image after the split ({len(absent)} "
                         f"such); label more images with it or change data.seed")
    return splits


def _csv_classes(path: Path, rows: list[CsvRow], problems: list[dict], labelled: list, train_rows: list,
                 recorded: list[str] | None) -> list[str]:
    """The training rows' class names, in data.class_order's order; bad input when there are too
    few, or when another row names a class no training row has."""
    if not train_rows:
        raise UsageError(f"{path} has no usable training rows ({len(rows)} rows, {len(problems)} left out, "
                         f"e.g. {problems[0]['detail'] if problems else 'none labelled'})")
    classes = class_order({n for _, _, names in train_rows for n in names}, recorded)
    if len(classes) < 2:
        raise UsageError(f"only one class ({classes[0]!r}) in the training rows of {path}: a classifier needs two")
    known = set(classes)
    stray = next(((r, n) for r, _, names in labelled for n in names if n not in known), None)
    if stray:
        raise UsageError(f"line {stray[0].line} of {path}: label {stray[1]!r} is not a class of the training "
                         f"rows ({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    return classes


def _usable_rows(rows: list[CsvRow], root: Path, path: Path, multilabel: bool = False,
                 labels_needed: bool = True) -> tuple[list[tuple[CsvRow, str]], list[dict]]:
    """(row, image path) of the rows training can use, and an audit problem for each other row.
    `labels_needed=False` (predict) keeps rows without a label. Paths are strings and checked with
    os.path: a CSV may list 100,000 images, and pathlib's parsing would cost seconds per start."""
    problems: list[dict] = []
    top = str(root)

    def leave_out(row: CsvRow, problem: str, why: str, file: str = "") -> None:
        problems.append({"path": file or os.path.join(top, row.file), "relpath": row.file,
                         "split": row.split or "train", "label": row.label, "problem": problem,
                         "detail": f"{path.name} line {row.line}: {why}", "action": ROW_LEFT_OUT})

    inside = top.rstrip(os.sep) + os.sep
    kept: list[tuple[CsvRow, str] | None] = []
    first: dict[str, int] = {}  # file -> where its first row is in `kept`
    repeats: dict[str, list[CsvRow]] = defaultdict(list)  # file -> its later rows
    for row in rows:
        if not row.file:
            leave_out(row, "missing", "no file name")
            continue
        if labels_needed and row.split != "test" and not (label_names(row.label, True) if multilabel else row.label):
            leave_out(row, "no_label", f"{row.file} has no label")
            continue
        file = _find_file(top, row.file)
        if file is None:
            leave_out(row, "missing", f"{row.file} not found under {root}")
        elif not file.startswith(inside):
            leave_out(row, "outside_root", f"{row.file} is outside data.root", file)
        elif file in first:
            repeats[file].append(row)
        else:
            first[file] = len(kept)
            kept.append((row, file))
    for file in sorted(repeats, key=first.get):  # in the order the files first appear
        head = kept[first[file]][0]
        labels = {";".join(sorted(label_names(r.label, multilabel))) for r in (head, *repeats[file])}
        if len(labels) > 1:
            kept[first[file]] = None
            for row in (head, *repeats[file]):
                leave_out(row, "conflicting_labels", f"{row.file} is listed under {len(labels)} labels "
                                                     f"({', '.join(sorted(labels))})", file)
            continue
        for row in repeats[file]:
            leave_out(row, "duplicate_row", f"{row.file} repeats line {head.line}", file)
    return [entry for entry in kept if entry is not None], problems


def _find_file(root: str, name: str) -> str | None:
    """The file a CSV row names, by its normalised path under the root (a name without an
    extension is tried with each image extension). Lexical, as the folder source is: a symlinked
    file inside the root counts as inside."""
    path = root + os.sep + name
    if name.startswith(os.sep) or "." + os.sep in path or os.sep * 2 in path:  # absolute, ./, ../ or //
        path = os.path.normpath(os.path.join(root, name))
    if os.path.isfile(path):
        return path
    if not os.path.splitext(path)[1]:
        for ext in _TRY_EXTENSIONS:
            if os.path.isfile(path + ext):
                return path + ext
    return None
