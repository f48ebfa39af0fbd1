"""Evaluate a checkpoint on labelled images: the run's own validation or test split, or any folder
of class folders, CSV, dataset or shards split. All of `launch/evaluate.py` after its arguments
are parsed.

The run's own split is rebuilt from the config the checkpoint records, with the same function
training used (`data.audit_training.audited_splits`; a shards run's: its index's val shards): the same
files, through the checkpoint's own eval transform, in eval mode and fp32, so the validation
split gives back exactly the val_acc the checkpoint recorded. Images that are training images of
the run (the same files, or copies with the same content, tar members included) get a warning:
their accuracy is not a held-out score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.errors import UsageError
from configs.schema import Config, config_from_dict
from data.audit_cache import MeasurementCache, audit_dir_for
from data.files import atomic_write_json, sha256_file
from data.folders import TEST_NAMES, Splits, list_images
from data.images import DEFAULT_MAX_PIXELS
from data.multilabel import MultiLabelSplits, multi_hot
from data.shards import INDEX, ShardIndex, ShardMembers, read_index
from data.sources import ListedImages, label_names, listed_images, load_splits
from trainer.reporting import plots
from data.audit_training import audited_splits
from trainer.inference.predict import (FilePredictions, InferenceOptions, Listing, listed_source,
                               predict_files, reader_of)
from trainer.files.model_file import LoadedClassifier, load_classifier
from trainer.task.task import task_for, task_of

SPLITS = ("val", "test")


def run_config(meta: dict, data_root: str | None = None) -> Config:
    """The config of the run that wrote a checkpoint; `data_root` replaces data.root (the data moved)."""
    cfg = config_from_dict(meta.get("config") or {})
    if data_root:
        cfg.data.root = str(Path(data_root).expanduser())
    if not cfg.data.root:
        raise UsageError("the checkpoint records no data.root; pass --data-root FOLDER (the run's image folder)")
    if not Path(cfg.data.root).expanduser().is_dir():
        raise UsageError(f"the run's data root {cfg.data.root} is not a folder here; pass --data-root FOLDER "
                         f"where the run's images are now")
    return cfg


@dataclass
class LabelledFiles:
    paths: list[Path]
    labels: list[int]  # indices into the checkpoint's class names (multi-label: each file's first label)
    source: str  # what these files are, for the report: a folder, or "the validation split of ROOT"
    targets: torch.Tensor | None = None  # multi-label: (N, C) 0/1, every label of every file
    shards: ShardIndex | None = None  # paths are this index's `SHARD.tar#KEY` references, not files


def labelled_folder(folder: Path, class_names: list[str]) -> LabelledFiles:
    """Every image under folder/<class name>/; class folders the checkpoint does not know are refused."""
    if not folder.is_dir():
        raise UsageError(f"not a folder: {folder}")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d.name for d in subdirs if d.name not in class_names]
    if unknown:
        raise UsageError(f"class folder(s) {', '.join(unknown[:5])} in {folder} are not classes of this checkpoint "
                         f"({', '.join(class_names[:8])}{'...' if len(class_names) > 8 else ''})")
    paths, labels = [], []
    for d in subdirs:
        for p in list_images(d):
            paths.append(p)
            labels.append(class_names.index(d.name))
    if not paths:
        raise UsageError(f"no labelled images in {folder}: expected {folder}/<class name>/<image files>")
    return LabelledFiles(paths, labels, str(folder))


def labelled_listed(listed: ListedImages, class_names: list[str], multilabel: bool) -> LabelledFiles:
    """The labelled images a CSV or a dataset lists, as the checkpoint's class indices (multi-label:
    every ';'-separated name); a class the checkpoint does not know is refused, rows without a
    label are left out with a note."""
    index = {name: i for i, name in enumerate(class_names)}
    paths, sets = [], []
    for path, label in zip(listed.paths, listed.labels):
        names = label_names(label, multilabel)
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UsageError(f"label {unknown[0]!r} of {path.name} in {listed.source} is not a class of this "
                             f"checkpoint ({', '.join(class_names[:8])}{'...' if len(class_names) > 8 else ''})")
        if names:
            paths.append(path)
            sets.append([index[n] for n in names])
    left_out = len(listed.paths) - len(paths) + len(listed.problems)
    if left_out:
        example = f", e.g. {listed.problems[0]['detail']}" if listed.problems else ""
        print(f"note: {left_out} row(s) of {listed.source} left out (no label, missing file, duplicate){example}",
              file=sys.stderr)
    if not paths:
        raise UsageError(f"no labelled images in {listed.source}")
    targets = torch.stack([multi_hot(s, len(class_names)) for s in sets]) if multilabel else None
    return LabelledFiles(paths, [s[0] for s in sets], listed.source, targets, listed.shards)


def labelled_shards(listed: ListedImages, class_names: list[str], multilabel: bool = False) -> LabelledFiles:
    """A split of a shards folder, labelled: its index's class list must be the checkpoint's, in
    the same order (a sample's label is an index into it, whatever the names would suggest)."""
    if multilabel:
        raise UsageError("shards record one class per image (a multi-label row's first): evaluate a multi-label "
                         "checkpoint on a CSV of labelled images, --csv FILE")
    refuse_other_classes(listed.shards.classes, class_names, listed.shards.root / INDEX)
    return labelled_listed(listed, class_names, multilabel)


def refuse_other_classes(theirs: list[str], class_names: list[str], where: Path) -> None:
    """One line saying how the class list in `where` differs from the checkpoint's, if it does."""
    if theirs == class_names:
        return
    extra = [n for n in theirs if n not in class_names]
    missing = [n for n in class_names if n not in theirs]
    if extra or missing:
        differ = "; ".join(f"{label}: {_names(names)}" for label, names in
                           (("not in the checkpoint", extra), ("not in the shards", missing)) if names)
    else:
        differ = f"the same names in another order ({_names(theirs)} against {_names(class_names)})"
    raise UsageError(f"the classes in {where} are not the checkpoint's ({differ}): a shard sample's label is an "
                     f"index into that list, so it must be the checkpoint's")


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def run_split(cfg: Config, split: str, class_names: list[str]) -> LabelledFiles:
    """The run's own validation split (as training used it, after the audit), or the labelled
    test/ folder of its data root."""
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(cfg.data.root).expanduser().resolve()
    if cfg.data.source == "shards":  # the val shards training validated on (make_shards writes no test split)
        return labelled_shards(listed_images(cfg.data, split), class_names, not task_for(cfg).one_class_per_image)
    if split == "test" and cfg.data.source in ("csv", "hf"):  # the CSV's test rows, the dataset's test split
        if cfg.data.source == "csv" and not cfg.data.csv_split_column:
            raise UsageError("the run's CSV has no split column, so no test rows; evaluate another CSV with --csv")
        return labelled_listed(listed_images(cfg.data, "test"), class_names, not task_for(cfg).one_class_per_image)
    if split == "test":
        test_dir = next((d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in TEST_NAMES), None)
        if test_dir is None:
            raise UsageError(f"the run's data root {root} has no test/ folder; evaluate another labelled folder "
                             f"by naming it instead of --split")
        files = labelled_folder(test_dir, class_names)
        return LabelledFiles(files.paths, files.labels, f"the test split of {root}")
    classes = load_splits(cfg.data).classes  # before the slower audit
    if classes != class_names:
        raise UsageError(f"the classes in {root} ({', '.join(classes[:8])}) are not the checkpoint's "
                         f"({', '.join(class_names[:8])}); pass --data-root with the run's own image folder")
    return validation_files(audited_splits(cfg.data), root)


def validation_files(splits: Splits, root: Path) -> LabelledFiles:
    """The (audited) validation split of a run's data as LabelledFiles; multi-label: with targets."""
    targets = None
    if isinstance(splits, MultiLabelSplits):
        targets = torch.stack([t for _, t in splits.targets(splits.val)])
    return LabelledFiles([Path(p) for p, _ in splits.val], [label for _, label in splits.val],
                         f"the validation split of {root}", targets)


def training_images_among(paths: list[Path], cfg: Config, shards: ShardIndex | None = None) -> int:
    """How many of `paths` (`shards`: references to its samples) the run trained on: the same file
    or sample, or a copy with the same content. Only images with the size of some training image
    are hashed (copies have equal sizes; a shard sample's size is in the index); the audit's cached
    hashes stand in for reading training files where they are still valid."""
    root = Path(cfg.data.root).expanduser().resolve()
    run_shards = read_index(root) if cfg.data.source == "shards" else None
    train = [Path(p) for p, _ in (run_shards.to_splits() if run_shards else load_splits(cfg.data)).train]
    theirs, ours = _Contents(run_shards), _Contents(shards)
    resolved = {p.resolve() for p in train}
    by_size: dict[int, list[Path]] = defaultdict(list)
    for p in train:
        by_size[theirs.size(p)].append(p)
    by_size.pop(-1, None)  # unreadable: neither counted nor hashed
    cache = MeasurementCache(audit_dir_for(root, cfg.data.audit_dir)) if run_shards is None else None

    def training_hash(p: Path) -> str:
        try:
            if cache is not None:
                stat = p.stat()
                cached = cache.get(p.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)
                if cached and cached.get("sha256"):
                    return cached["sha256"]
            return theirs.sha256(p)
        except OSError:
            return ""

    count, train_hashes, hashed_sizes = 0, set(), set()
    for path in paths:
        if path.resolve() in resolved:
            count += 1
            continue
        size = ours.size(path)
        if size not in by_size:
            continue
        if size not in hashed_sizes:
            hashed_sizes.add(size)
            train_hashes |= {training_hash(p) for p in by_size[size]}
        try:
            count += ours.sha256(path) in train_hashes
        except OSError:
            pass  # predict_files reports the file as unreadable
    return count


class _Contents:
    """Sizes and sha256 of image files, or of the samples of one shards index (read from the tar)."""

    def __init__(self, shards: ShardIndex | None):
        self.members = ShardMembers(shards) if shards is not None else None

    def size(self, path: Path) -> int:
        try:
            return self.members.size(str(path)) if self.members else path.stat().st_size
        except OSError:
            return -1

    def sha256(self, path: Path) -> str:
        if self.members:
            return hashlib.sha256(self.members.read(str(path))).hexdigest()
        return sha256_file(path)


def top_losses(files: LabelledFiles, preds: FilePredictions, count: int) -> list[int]:
    """Indices of the wrong predictions with the highest loss (least probability on the truth), fastai's name."""
    labels = torch.tensor(files.labels)
    predicted = preds.probs.argmax(1)
    wrong = [i for i in range(len(files.paths)) if i not in preds.errors and predicted[i] != labels[i]]
    wrong.sort(key=lambda i: preds.probs[i, labels[i]].item())
    return wrong[:count]


def plot_top_losses(path: Path, loaded: LoadedClassifier, files: LabelledFiles, preds: FilePredictions,
                    indices: list[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """The images as the model saw them (its eval transform), titled "actual / predicted (probability)"."""
    p, names, transform = loaded.preprocessing, loaded.class_names, reader_of(loaded.eval_transform(), files.shards)
    images = np.zeros((len(indices), p.image_size, p.image_size, 3), dtype=np.float32)
    for row, i in enumerate(indices):
        images[row] = transform.load(str(files.paths[i]), max_pixels).permute(1, 2, 0).numpy() / 255.0
    titles = []
    for i in indices:
        guess = int(preds.probs[i].argmax())
        titles.append(f"{names[files.labels[i]]} / {names[guess]} ({preds.probs[i, guess].item():.2f})")
    return plots.image_grid(path, images, titles, wrong=[True] * len(indices),
                            title="top losses: actual / predicted (probability)" if indices else "no mistakes")


def report_of(loaded: LoadedClassifier, files: LabelledFiles, preds: FilePredictions) -> dict:
    """The checkpoint's task's report of the readable files (accuracy and per-class P/R/F1, or
    mAP and F1 at its thresholds), and the unreadable ones."""
    task, ok = task_of(loaded.metadata), preds.ok
    truth = task.truth(files.labels, files.targets)[ok]
    return task.report(preds.probs[ok], truth, loaded.class_names, task.thresholds(loaded.metadata)) | {
        "unreadable": [str(files.paths[i]) for i in sorted(preds.errors)]}


def evaluate_checkpoint(checkpoint: str | Path, options: InferenceOptions, *, folder: str | None = None,
                        split: str | None = None, data_root: str | None = None, out_dir: str | Path | None = None,
                        top_loss_count: int = 16, listing: Listing = Listing()) -> dict:
    """evaluate.py: the report of `checkpoint` on `folder`, on the run's own `split` or on what
    `listing` names (a CSV, a dataset, a shards split), printed and written to `out_dir`
    (metrics.json, confusion_matrix.png, top_losses.png). Everything that can fail on bad input
    fails before a file is written."""
    options.check()
    listing.check()
    if (folder is not None) + (split is not None) + listing.named != 1:
        raise UsageError("name one of: a labelled folder, --split val|test, --csv FILE, --hf DIR or --shards DIR")
    if top_loss_count < 0:
        raise UsageError(f"--top-losses must be 0 or more (got {top_loss_count})")
    checkpoint = Path(checkpoint)
    loaded = load_classifier(checkpoint)
    meta, names = loaded.metadata, loaded.class_names
    task = task_of(meta)
    multilabel = not task.one_class_per_image  # how a CSV's labels read: ';'-separated sets
    max_pixels, overlap = DEFAULT_MAX_PIXELS, None
    if split is not None:
        cfg = run_config(meta, data_root)
        files = run_split(cfg, split, names)
        max_pixels = cfg.data.max_image_pixels or DEFAULT_MAX_PIXELS
        # Validation's batch size: per-image results do not depend on it, but kernels may.
        options = dataclasses.replace(options, batch_size=options.batch_size or cfg.data.batch_size)
    else:
        if listing.shards:
            files = labelled_shards(listed_source(meta, listing), names, multilabel)
        elif listing.named:
            files = labelled_listed(listed_source(meta, listing), names, multilabel)
        elif multilabel:
            raise UsageError("a multi-label checkpoint is evaluated on a CSV of labelled images: --csv FILE "
                             "(e.g. --csv FOLDER/labels.csv)")
        else:
            files = labelled_folder(Path(folder).expanduser(), names)
        cfg = _reachable_run_config(meta, data_root if not listing.csv else None)
        if cfg is not None:
            try:
                overlap = training_images_among(files.paths, cfg, files.shards)
            except UsageError as e:  # the run's data root changed: the check is lost, not the evaluation
                print(f"note: could not check for the run's training images ({e})", file=sys.stderr)
    preds = predict_files(loaded, files.paths, options, max_pixels, files.shards)
    report = report_of(loaded, files, preds) | {
        "checkpoint": str(checkpoint), "source": files.source, "folder": folder, "split": split,
        "task": task.name, "tta": preds.flip_tta,
        "preprocessing": loaded.preprocessing.to_dict(), "checkpoint_epoch": meta["epoch"],
        "checkpoint_metrics": meta.get("metrics", {})}
    if overlap is not None:
        report["training_images"] = overlap
    out = Path(out_dir) if out_dir else checkpoint.parent / (f"eval-{split}" if split else "eval")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", report)
    written = [out / "metrics.json"]
    if task.one_class_per_image:  # a confusion matrix and top losses need one true class per image
        written += [
            plots.confusion_plot(out / "confusion_matrix.png", np.array(report["confusion_matrix"]), names,
                                 title=f"{split} split" if split else Path(folder).name if folder else listing.name),
            plot_top_losses(out / "top_losses.png", loaded, files, preds, top_losses(files, preds, top_loss_count),
                            max_pixels),
        ]
    print("\n".join([*task.report_lines(report, meta, split), f"wrote {', '.join(str(p) for p in written)}"]))
    _warn_about(report, preds)
    return report


def _reachable_run_config(meta: dict, data_root: str | None) -> Config | None:
    """The run's config when its data root is here (to find its training images), else None."""
    cfg = config_from_dict(meta.get("config") or {})
    if data_root:
        cfg.data.root = str(Path(data_root).expanduser())
    if cfg.data.root and Path(cfg.data.root).expanduser().is_dir():
        return cfg
    return None


def _warn_about(report: dict, preds: FilePredictions) -> None:
    """Training images among the evaluated ones, and unreadable files, on stderr."""
    overlap, total = report.get("training_images"), report["images"] + len(preds.errors)
    if overlap:
        print(f"warning: {overlap} of {total} images in {report['source']} were training images of this "
              f"checkpoint (same file or same content), so this accuracy is not a held-out score; "
              f"use --split val for the run's own validation split", file=sys.stderr)
    if preds.errors:
        print(f"warning: {len(preds.errors)} unreadable file(s) left out:", file=sys.stderr)
        for i in sorted(preds.errors):
            print(f"  {preds.paths[i]}: {preds.errors[i]}", file=sys.stderr)
