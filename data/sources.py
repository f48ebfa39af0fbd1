"""Where a run's samples come from, chosen by `data.source`: every source becomes the same
`data.folders.Splits` (class names, train and validation (path, label) lists, test paths), so the
audit, the transforms, the samplers, balancing, class weights, predict/evaluate and the batch
grid work unchanged whatever the source.

- folder: class folders (`data.folders.discover`).
- csv: `data.csv` lists one image per row, paths relative to `data.root` (Kaggle's `train/` +
  `labels.csv`). Rows that cannot be used (missing file, duplicate, the same file under two
  labels, a path outside data.root, no label) are left out and reported by the audit with their
  line numbers; a missing column, a label that is not a class, several labels in one row or no
  usable row at all is bad input.
- hf: a Hugging Face `datasets` dataset on disk (`save_to_disk`, parquet files, or an
  `imagefolder`). Images that are files stay where they are; images stored as bytes inside the
  dataset are written once, as the same encoded bytes, to a cache keyed by the dataset's
  fingerprint, so decoding, the audit and its cache read files as for every other source.
- shards: tar shards (`data.shards`): the index's samples, as `SHARD.tar#KEY` references that
  only `data.shards.ShardMembers` reads (training streams them with its own loader). They were
  audited when the shards were written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from configs.errors import UsageError
from data.folders import IMAGE_EXTENSIONS, Sample, Splits, discover, stratified_split
from data.multilabel import SEPARATOR, MultiLabelSplits
from data.shards import SPLITS as SHARD_SPLITS, ShardIndex, read_index, verify_shards

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
# Extensions tried, in order, for a CSV file name without one (Kaggle's `id` columns).
_TRY_EXTENSIONS = (".jpg", ".jpeg", ".png", *sorted(IMAGE_EXTENSIONS - {".jpg", ".jpeg", ".png"}))
ROW_LEFT_OUT = "row left out"  # the row, not the file: a duplicate row's file stays in by its first row


def load_splits(d) -> Splits:
    """The samples of `data.source` (d: the config's DataConfig) as Splits."""
    if d.source == "csv":
        return csv_splits(d)
    if d.source == "hf":
        return hf_splits(d)
    if d.source == "shards":
        return read_index(d.root).to_splits()
    return discover(d.root, d.val_fraction, d.seed)


def data_root(d) -> Path:
    root = Path(d.root).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"data.root {'is not a folder' if root.exists() else 'does not exist'}: {root}")
    return root


# ----------------------------------------------------------------------------------------------
# CSV


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


def csv_splits(d) -> Splits:
    """The CSV source's splits; with data.task = multilabel, MultiLabelSplits whose samples carry
    their first listed label (what the split is stratified by) and `label_sets` all of them."""
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
    classes = _csv_classes(path, rows, problems, labelled, train_rows)
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
    splits = MultiLabelSplits(root, classes, train, val, test, "csv", problems, label_sets)
    absent = [c for c, n in splits.class_counts("train").items() if n == 0]
    if absent:
        raise UsageError(f"class {absent[0]!r} of {path} is on no training image after the split ({len(absent)} "
                         f"such); label more images with it or change data.seed")
    return splits


def _csv_classes(path: Path, rows: list[CsvRow], problems: list[dict], labelled: list, train_rows: list) -> list[str]:
    """The training rows' class names, sorted; bad input when there are too few, or when another
    row names a class no training row has."""
    if not train_rows:
        raise UsageError(f"{path} has no usable training rows ({len(rows)} rows, {len(problems)} left out, "
                         f"e.g. {problems[0]['detail'] if problems else 'none labelled'})")
    classes = sorted({n for _, _, names in train_rows for n in names})
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


@dataclass
class ListedImages:
    """The images a CSV, a Hugging Face dataset or a shards folder lists, for predict and evaluate:
    every usable row, every sample of a split."""

    paths: list[Path]
    labels: list[str]  # class names as the source writes them; "" for a row without one
    source: str  # what they are, for the report
    problems: list[dict]  # rows left out, as csv_splits reports them
    shards: ShardIndex | None = None  # paths are this index's `SHARD.tar#KEY` references, not files


def listed_images(d, split: str | None = None, labelled: bool = True) -> ListedImages:
    """Every usable row of the source `d` describes (d.source "csv", "hf" or "shards"): for a CSV
    its rows (of `split` only, with a split column), for a dataset its `split` (default: test, else
    validation, else train), for shards the samples of `split` (default: val). `labelled=False`
    (predict): a CSV needs no label column."""
    if d.source == "shards":
        return shard_images(d.root, split or "val")
    if d.source == "csv":
        path = csv_path(d)
        rows = read_csv_rows(path, d.csv_file_column, d.csv_label_column if labelled else "", d.csv_split_column)
        kept, problems = _usable_rows(rows, data_root(d), path, d.task == "multilabel", labels_needed=False)
        kept = [(r, p) for r, p in kept if split is None or not d.csv_split_column or r.split == split]
        where = f"{path}" + (f" ({split} rows)" if split and d.csv_split_column else "")
        return ListedImages([Path(p) for _, p in kept], [r.label for r, _ in kept], where, problems)
    root = data_root(d)
    parts = open_hf_dataset(root)
    name = split or next((n for n in ("test", *HF_VAL_NAMES, "train") if n in parts), "")
    if name not in parts:
        raise UsageError(f"the dataset in {root} has no {name!r} split (splits: {', '.join(parts)})")
    part = parts[name]
    if d.hf_image_column not in part.column_names:
        raise UsageError(f"the dataset in {root} has no column {d.hf_image_column!r} (columns: "
                         f"{', '.join(part.column_names)}); pass the run's data.hf_image_column")
    _, files = _hf_files({name: part}, d.hf_image_column, root)
    labels = [""] * len(part)
    if d.hf_label_column in part.column_names:
        names = getattr(part.features[d.hf_label_column], "names", None)
        labels = [names[v] if names and isinstance(v, int) and v >= 0 else str(v) for v in part[d.hf_label_column]]
    return ListedImages([Path(p) for p in files[name]], labels, f"the {name!r} split of {root}", [])


def shard_images(root, split: str) -> ListedImages:
    """The samples of one split of a shards folder, in the index's order, with their class names.
    That split's shards are checked against their sha256 first: a damaged shard is refused, not
    read (its samples could decode into wrong pixels, or fail one by one)."""
    index = read_index(root)
    if split not in SHARD_SPLITS:
        raise UsageError(f"{index.root} holds {' and '.join(SHARD_SPLITS)} shards only (launch/make_shards.py "
                         f"writes no {split} split): evaluate {split} images by naming their folder, or with "
                         f"--csv FILE or --hf DIR")
    verify_shards(index, (split,))
    samples = index.samples(split)
    return ListedImages([Path(ref) for ref, _ in samples], [index.classes[label] for _, label in samples],
                        f"the {split} shards of {index.root}", [], index)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets


HF_VAL_NAMES = ("validation", "val", "valid")
MANIFEST = "files.json"  # written last: its presence means the cache folder is complete


def hf_splits(d) -> Splits:
    root = data_root(d)
    parts = open_hf_dataset(root)
    if "train" not in parts:
        raise UsageError(f"the dataset in {root} has no 'train' split (splits: {', '.join(parts) or 'none'})")
    train_part = parts["train"]
    for column in (d.hf_image_column, d.hf_label_column):
        if column not in train_part.column_names:
            key = "hf_image_column" if column == d.hf_image_column else "hf_label_column"
            raise UsageError(f"the dataset in {root} has no column {column!r} (columns: "
                             f"{', '.join(train_part.column_names)}); set data.{key}")
    if len(train_part) == 0:
        raise UsageError(f"the 'train' split of the dataset in {root} is empty")
    classes, label_of = _hf_classes(train_part, d.hf_label_column)
    files_root, files = _hf_files(parts, d.hf_image_column, root)
    train = [(files["train"][i], label_of(v)) for i, v in enumerate(train_part[d.hf_label_column])]
    val_name = next((n for n in HF_VAL_NAMES if n in parts), None)
    if val_name:
        val = [(files[val_name][i], _hf_label(label_of, v, val_name, i, root))
               for i, v in enumerate(parts[val_name][d.hf_label_column])]
    else:
        by_class: dict[str, list[Path]] = defaultdict(list)
        for path, label in train:
            by_class[classes[label]].append(Path(path))
        train, val = stratified_split(by_class, classes, d.val_fraction, d.seed)
    test = list(files.get("test", []))
    return Splits(files_root, classes, sorted(train), sorted(val), sorted(test), layout="hf")


def open_hf_dataset(root: Path) -> dict:
    """{split name: datasets.Dataset} of a dataset saved with save_to_disk, parquet files, or an
    imagefolder, read from disk only."""
    try:
        import datasets
    except ImportError:
        raise UsageError("data.source = 'hf' needs the datasets package: pip install -e '.[hf]'") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data: never ask the Hub for anything
    datasets.disable_progress_bars()
    _refuse_empty_saved(root)
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
        elif parquet := _parquet_files(root):
            loaded = datasets.load_dataset("parquet", data_files=parquet)
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
    except UsageError:
        raise
    except Exception as e:  # datasets raises many types for unreadable data
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{root} is not a readable Hugging Face dataset (save_to_disk folder, parquet files or "
                         f"imagefolder): {type(e).__name__}: {first}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return {_canonical_split(name): part for name, part in loaded.items()}


def _refuse_empty_saved(root: Path) -> None:
    # datasets' load_from_disk fails on an empty saved dataset with an IndexError: say what it is.
    for state in [root / "state.json", *root.glob("*/state.json")]:
        try:
            empty = json.loads(state.read_text()).get("_data_files") == []
        except (OSError, ValueError, AttributeError):
            continue  # load_from_disk says what is wrong with it
        if empty:
            split = state.parent.name if state.parent != root else "train"
            raise UsageError(f"the {split!r} split of the dataset in {root} is empty (no data files in {state})")


def _canonical_split(name: str) -> str:
    return "train" if name.lower() in ("train", "training") else name.lower()


def _parquet_files(root: Path) -> dict[str, list[str]]:
    """{split: files} for Hub-style parquet layouts: `train-*.parquet`, `data/train-*.parquet`,
    `train/*.parquet`; any other parquet files are all training data."""
    files = sorted(p for p in root.rglob("*.parquet") if not any(s.startswith(".") for s in p.parts))
    splits: dict[str, list[str]] = defaultdict(list)
    for p in files:
        words = [p.parent.name.lower(), p.stem.split("-")[0].lower()]
        split = next((SPLIT_NAMES[w] for w in words if w in SPLIT_NAMES), "train")
        splits[{"val": "validation"}.get(split, split)].append(str(p))
    return dict(splits)


def _hf_classes(part, column: str):
    """(class names, value -> index): a ClassLabel's names, else the sorted distinct values."""
    feature = part.features[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names), int
    values = sorted({str(v) for v in part[column]}, key=lambda v: (len(v), v) if v.isdigit() else (0, v))
    if len(values) < 2:
        raise UsageError(f"the {column!r} column has one value only ({values[0] if values else 'none'}): a "
                         f"classifier needs two classes")
    index = {v: i for i, v in enumerate(values)}
    return values, lambda v: index.get(str(v), -1)


def _hf_label(label_of, value, split: str, row: int, root: Path) -> int:
    label = label_of(value)
    if label < 0:
        raise UsageError(f"row {row} of the {split!r} split in {root}: label {value!r} is not a class of the "
                         f"'train' split")
    return label


def _hf_files(parts: dict, column: str, root: Path) -> tuple[Path, dict[str, list[str]]]:
    """(the folder the image files are under, {split: one path per row}). An imagefolder's files
    are used in place; images stored in the dataset are written out once per split's fingerprint,
    into one folder per dataset (so training and predict share them, and the audit cache too)."""
    import datasets

    plain = {name: part.cast_column(column, datasets.Image(decode=False)) for name, part in parts.items()}
    paths = {name: [(cell or {}).get("path") for cell in _cells(part, column)] for name, part in plain.items()}
    stored_as_files = all(p and Path(p).is_file() and Path(p).resolve().is_relative_to(root)
                          for rows in paths.values() for p in rows)
    if stored_as_files:
        return root, {name: [str(Path(p).resolve()) for p in rows] for name, rows in paths.items()}
    folder = hf_cache_dir() / f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    files = {}
    for name, part in plain.items():
        split_dir = folder / f"{name}-{part._fingerprint}"
        if not (split_dir / MANIFEST).is_file():
            _write_images(part, column, split_dir)
        files[name] = [str(split_dir / n) for n in json.loads((split_dir / MANIFEST).read_text())]
    return folder, files


def _cells(part, column):
    """The column's cells, a batch at a time: the image bytes of a whole split need not fit in memory."""
    for batch in part.select_columns([column]).iter(batch_size=256):
        yield from batch[column]


def hf_cache_dir() -> Path:
    return Path(os.environ.get("IMGTRAIN_HF_DIR", "~/.cache/imgtrain/hf")).expanduser()


def _image_name(index: int, path: str | None, data: bytes | None) -> str:
    """A stable name per row, with the extension its bytes decode by (the name, else the magic)."""
    ext = Path(path).suffix.lower() if path else ""
    if ext not in IMAGE_EXTENSIONS and data is not None:
        ext = _sniff(data)
    return f"{index:08d}{ext or '.img'}"


def _sniff(data: bytes) -> str:
    for magic, ext in ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp")):
        if data.startswith(magic):
            return ext
    return ".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else ".img"


def _write_images(part, column: str, folder: Path) -> None:
    """Every row's encoded bytes as a file, and the manifest of their names, into a temporary
    folder renamed when complete (two processes may race: the rename keeps one whole copy)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = []
    for i, cell in enumerate(_cells(part, column)):
        cell = cell or {}
        data = cell.get("bytes")
        if data is None and cell.get("path") and Path(cell["path"]).is_file():
            data = Path(cell["path"]).read_bytes()
        names.append(_image_name(i, cell.get("path"), data))
        # A row without image bytes becomes an empty file: the audit reports it as empty.
        (tmp / names[-1]).write_bytes(data or b"")
    (tmp / MANIFEST).write_text(json.dumps(names))
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete one from an interrupted run
    os.replace(tmp, folder)


__all__ = ["ListedImages", "Sample", "csv_splits", "hf_splits", "listed_images", "load_splits", "open_hf_dataset",
           "read_csv_rows", "shard_images"]
