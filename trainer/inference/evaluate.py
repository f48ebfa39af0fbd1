"""Evaluate a checkpoint on labelled images: the run's own validation or test split, or any folder
of class folders, CSV, dataset or shards split. All of `launch/evaluate.py` after its arguments
are parsed.

The run's own split is rebuilt from the config the checkpoint records by the run's data source,
in the checkpoint's class order (`data.sources.Source.own_split`: the audited validation split as
training saw it, a shards run's val shards): the same images, through the checkpoint's own eval
transform, in eval mode and fp32, so the validation split gives back exactly the val_acc the
checkpoint recorded. Labels are class names, mapped onto the checkpoint's order. Images that are
training images of the run (the same files, or copies with the same content, tar members
included) get a warning (as predict's: `count_training_images`): their accuracy is not a
held-out score.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.errors import UsageError
from configs.schema import Config, config_from_dict
from data.files import atomic_write_json, atomic_write_text
from data.folders import list_images
from data.images import DEFAULT_MAX_PIXELS
from data.multilabel import multi_hot
from data.sources import FILES, ImageStore, ListedImages, label_names, open_source
from trainer.reporting import plots
from trainer.reporting.mistakes import TOP_LOSSES, Evaluated, Mistakes, find_mistakes, label_issue_lines, write_mistakes
from trainer.inference.predict import (FilePredictions, InferenceOptions, Listing, count_training_images,
                                       listed_source, predict_files, warn_training_images)
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
    store: ImageStore = FILES  # how `paths` are read: files, or a source's references (tar members)


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
    label are left out with a note. A source whose class list must be the checkpoint's (shards)
    is refused when its names differ; its order does not matter: labels go by name."""
    if listed.classes is not None:
        refuse_other_classes(listed.classes, class_names, listed.source)
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
    return LabelledFiles(paths, [s[0] for s in sets], listed.source, targets, listed.store)


def refuse_other_classes(theirs: list[str], class_names: list[str], where: str) -> None:
    """One line saying how the class names of `where` differ from the checkpoint's, if they do."""
    extra = [n for n in theirs if n not in class_names]
    missing = [n for n in class_names if n not in theirs]
    if extra or missing:
        differ = "; ".join(f"{label}: {_names(names)}" for label, names in
                           (("not in the checkpoint", extra), ("not in these", missing)) if names)
        raise UsageError(f"the classes of {where} are not the checkpoint's ({differ}); evaluate them with a "
                         f"checkpoint of these classes")


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def run_split(cfg: Config, split: str, class_names: list[str]) -> LabelledFiles:
    """The run's own validation split (as training saw it) or test split, labelled in the
    checkpoint's class order; data whose classes are not the checkpoint's is refused."""
    if split not in SPLITS:
        raise UsageError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    source = open_source(cfg.data, class_names)  # the checkpoint's recorded order wins
    if source.classes != class_names:
        raise UsageError(f"the classes in {source.root} ({', '.join(source.classes[:8])}) are not the checkpoint's "
                         f"({', '.join(class_names[:8])}); pass --data-root with the run's own image folder")
    return labelled_listed(source.own_split(split), class_names, not task_for(cfg).one_class_per_image)


def mistakes_of(loaded: LoadedClassifier, files: LabelledFiles, preds: FilePredictions) -> Evaluated:
    """The readable files' paths, labels and probabilities, for the tables of what went wrong."""
    task, ok = task_of(loaded.metadata), preds.ok
    truth = task.truth(files.labels, files.targets)[ok]
    thresholds = task.thresholds(loaded.metadata)
    return Evaluated([str(p) for p, keep in zip(files.paths, ok.tolist()) if keep], truth.numpy(),
                     preds.probs[ok].numpy(), loaded.class_names,
                     thresholds.numpy() if thresholds is not None else None)


def write_mistakes_of(out: Path, loaded: LoadedClassifier, files: LabelledFiles, evaluated: Evaluated,
                      mistakes: Mistakes, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Path]:
    """The top losses (as the model saw them: its eval transform), most-confused and label-issue tables."""
    transform = files.store.with_transform(loaded.eval_transform())

    def load_image(i: int) -> np.ndarray:
        return transform.load(evaluated.paths[i], max_pixels).permute(1, 2, 0).numpy()

    return write_mistakes(out, mistakes, load_image)


def report_of(loaded: LoadedClassifier, files: LabelledFiles, preds: FilePredictions) -> dict:
    """The checkpoint's task's report of the readable files (accuracy and per-class P/R/F1, or
    mAP and F1 at its thresholds), and the unreadable ones."""
    task, ok = task_of(loaded.metadata), preds.ok
    truth = task.truth(files.labels, files.targets)[ok]
    return task.report(preds.probs[ok], truth, loaded.class_names, task.thresholds(loaded.metadata)) | {
        "unreadable": [str(files.paths[i]) for i in sorted(preds.errors)]}


def evaluate_checkpoint(checkpoint: str | Path, options: InferenceOptions, *, folder: str | None = None,
                        split: str | None = None, data_root: str | None = None, out_dir: str | Path | None = None,
                        top_loss_count: int = TOP_LOSSES, listing: Listing = Listing(),
                        list_label_issues: bool = False) -> dict:
    """evaluate.py: the report of `checkpoint` on `folder`, on the run's own `split` or on what
    `listing` names (a CSV, a dataset, a shards split), printed and written to `out_dir`
    (metrics.json, confusion_matrix.png, and trainer.reporting.mistakes's top_losses.png / .csv,
    most_confused.csv and label_issues.csv; with `list_label_issues` the likely label errors are
    printed and their paths written to label_issues.txt). Everything that can fail on bad input
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
        if listing.named:
            files = labelled_listed(listed_source(meta, listing), names, multilabel)
        elif multilabel:
            raise UsageError("a multi-label checkpoint is evaluated on a CSV of labelled images: --csv FILE "
                             "(e.g. --csv FOLDER/labels.csv)")
        else:
            files = labelled_folder(Path(folder).expanduser(), names)
        overlap = count_training_images(meta, files.paths, files.store, listing.run_data_root)
    preds = predict_files(loaded, files.paths, options, max_pixels, files.store)
    report = report_of(loaded, files, preds) | {
        "checkpoint": str(checkpoint), "source": files.source, "folder": folder, "split": split,
        "task": task.name, "tta": preds.flip_tta,
        "preprocessing": loaded.preprocessing.to_dict(), "checkpoint_epoch": meta["epoch"],
        "checkpoint_metrics": meta.get("metrics", {})}
    if overlap is not None:
        report["training_images"] = overlap
    evaluated = mistakes_of(loaded, files, preds)
    mistakes = find_mistakes(evaluated, top_loss_count)
    report["likely_label_errors"] = len(mistakes.label_issues) if mistakes.labels_judged else None  # None: not judged
    out = Path(out_dir) if out_dir else checkpoint.parent / (f"eval-{split}" if split else "eval")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", report)
    written = [out / "metrics.json"]
    if task.one_class_per_image:  # a confusion matrix needs one true class per image
        title = f"{split} split" if split else Path(folder).name if folder else listing.name
        written.append(plots.confusion_plot(out / "confusion_matrix.png", np.array(report["confusion_matrix"]), names,
                                            title=title))
    written += write_mistakes_of(out, loaded, files, evaluated, mistakes, max_pixels)
    lines = [*task.report_lines(report, meta, split),
             *([f"{len(mistakes.label_issues)} likely label errors (cleanlab): {out / 'label_issues.csv'}"]
               if mistakes.labels_judged else [])]
    if list_label_issues:
        atomic_write_text(out / "label_issues.txt", "".join(f"{r['path']}\n" for r in mistakes.label_issues))
        written.append(out / "label_issues.txt")
        lines += label_issue_lines(mistakes.label_issues)
    print("\n".join([*lines, f"wrote {', '.join(str(p) for p in written)}"]))
    for note in mistakes.notes:
        print(f"note: {note}", file=sys.stderr)
    _warn_about(report, preds)
    return report


def _warn_about(report: dict, preds: FilePredictions) -> None:
    """Training images among the evaluated ones, and unreadable files, on stderr."""
    warn_training_images(report.get("training_images"), report["images"] + len(preds.errors), report["source"],
                         "so this accuracy is not a held-out score; use --split val for the run's own validation "
                         "split")
    if preds.errors:
        print(f"warning: {len(preds.errors)} unreadable file(s) left out:", file=sys.stderr)
        for i in sorted(preds.errors):
            print(f"  {preds.paths[i]}: {preds.errors[i]}", file=sys.stderr)
