"""data.source = "hf": a Hugging Face `datasets` dataset on disk (`save_to_disk`, parquet files,
or an `imagefolder`), read offline. Its train split trains; its validation split (else a split by
data.val_fraction) validates; its test split is the run's test split. Images that are files stay
where they are; images stored as bytes inside the dataset are written once, as the same encoded
bytes, to a cache keyed by the dataset's fingerprint (`hf_cache_dir()`, $IMGTRAIN_HF_DIR), so
decoding, the audit and its cache read files as for every other source. Those files live in the
cache, not under data.root: `Splits.root` is the cache folder.

Class names: a ClassLabel's names, else the label column's distinct values, in
data.class_order's order (a ClassLabel's integers are mapped to them by name).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

from configs.errors import UsageError
from data.class_order import class_order
from data.folders import IMAGE_EXTENSIONS, Splits, data_root, stratified_split
from data.sources.base import SPLIT_NAMES, ListedImages, Source, by_fraction, register


@register("hf")
class HfSource(Source):
    def _load(self) -> Splits:
        return hf_splits(self.d, self.recorded)

    def listed(self, split: str | None = None, labelled: bool = True) -> ListedImages:
        """The rows of `split` (default: test, else validation, else train), labelled by the label
        column's names when it has one."""
        d = self.d
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
            labels = [names[v] if names and isinstance(v, int) and v >= 0 else str(v)
                      for v in part[d.hf_label_column]]
        return ListedImages([Path(p) for p in files[name]], labels, f"the {name!r} split of {root}")

    def _test_split(self) -> ListedImages:
        return self.listed("test")

    @classmethod
    def description(cls, data: dict, layout: str) -> str:
        return (f"A Hugging Face dataset on disk (`data.root` = `{data.get('root', '?')}`); validation: its "
                f"validation split, or else {by_fraction(data)}")


HF_VAL_NAMES = ("validation", "val", "valid")
MANIFEST = "files.json"  # written last: its presence means the cache folder is complete


def hf_splits(d, recorded: list[str] | None = None) -> Splits:
    """The dataset's train split, and its validation split or else one split off by
    data.val_fraction; `recorded`: a recorded class order (data.class_order)."""
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
    classes, label_of = _hf_classes(train_part, d.hf_label_column, recorded)
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


def _hf_classes(part, column: str, recorded: list[str] | None):
    """(class names in data.class_order's order, value -> index): a ClassLabel's names (its
    integer values mapped by name), else the distinct values as text."""
    feature = part.features[column]
    names = getattr(feature, "names", None)
    if names:
        classes = class_order(names, recorded)
        position = {name: i for i, name in enumerate(classes)}
        at = [position[name] for name in names]  # the ClassLabel's value -> our index
        return classes, lambda v: at[v] if 0 <= v < len(at) else -1
    values = class_order({str(v) for v in part[column]}, recorded)
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
