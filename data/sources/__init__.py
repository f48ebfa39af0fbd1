"""Where a run's samples come from: one Source per `data.source`, made by one factory
(`open_source(cfg.data, classes)`, a registry filled by `@register`, as timm's `create_reader`).
Training, evaluation, prediction, export and make_shards ask the Source and never check its kind.

Sources (one module each):
- folder (folder.py): class folders (`data.folders.discover`), and an optional labelled test/ folder.
- csv (csv_rows.py): `data.csv` lists one image per row, paths relative to data.root.
- hf (hf_dataset.py): a Hugging Face `datasets` dataset on disk; images stored inside it are
  written once to a cache outside data.root.
- shards (tar_shards.py): tar shards written by launch/make_shards.py; no test split.

What a Source owns (data/sources/base.py, `Source`):
- `splits()`: the class names and the train / validation (path, label) lists and test paths, as
  one `data.folders.Splits` whatever the source, so the audit, transforms, samplers, balancing,
  class weights and the batch grid work unchanged; `audited()`: the same after the audit.
- `store`: how its paths are read (`FILES`, or the shards' `SHARD.tar#KEY` references).
- training: `check_training` (what it refuses: shards take no balanced sampler, cached features
  or GPU decoding), `open_for_training` (checks before training: shard sizes and sha256),
  `training_data` (audit and dataset statistics), `train_batches` (a resumable sampler, or the
  shards' stream), `decodes_on_device`.
- predict and evaluate: `listed(split)` (what --csv/--hf/--shards list), `own_split(split)` (the
  run's validation split, or its test split where it has one), `training_images()` (is an image
  one of the run's training images: the same file or sample, or the same content).
- predict --kaggle: `submission_columns()` and `submission_ids(paths)` (a CSV's own column names
  and file cells as written, a shard sample's key, else `Id, Class` and file stems).
- `description(data, layout)` (the model card's sentence), `check_shardable()` (make_shards).
- `reads(d)` (`source_reads(d)`): the paths a run reads, which its run.dir may not be or lie in.

The class-order rule (data.class_order.class_order, the one function every source calls):
  1. A recorded order wins: a resumed run keeps the class_names of the checkpoint it resumes
     (state.json), a checkpoint that predicts or evaluates keeps its own (the model file's
     header), whatever the rule was when they were written. A source given a recorded order
     (`open_source(d, classes)`) uses it when it holds exactly those names.
  2. Otherwise, class names that are all integers ("0", "1", "10"; ASCII digits, an optional
     leading minus) sort as numbers: 0, 1, 2, ..., 10, 11.
  3. Any other set of names sorts as text by code point (Python's `sorted`, as class folders
     always have): "Cat" before "cat", "class10" before "class2".
So the same labels get the same class indices from a folder, a CSV, a dataset (a ClassLabel's
integers are mapped to its names) or shards (their written labels are renumbered as read).
"""

from data.sources import csv_rows, folder, hf_dataset, tar_shards  # noqa: F401  (each registers its Source)
from data.sources.base import (SOURCES, SUBMISSION_COLUMNS, Feed, ListedImages, Source, describe_source, file_ids,
                               open_listing, open_source, register, source_reads)
from data.sources.csv_rows import label_names, read_csv_rows
from data.sources.hf_dataset import open_hf_dataset
from data.sources.stores import FILES, ImageStore
from data.sources.training_images import TrainingImages


def load_splits(d, classes: list[str] | None = None):
    """The splits of the source `d` describes (d: a DataConfig); `classes`: a recorded order."""
    return open_source(d, classes).splits()


def audited_splits(d, classes: list[str] | None = None):
    """The split a run of this data config trains and validates on, after the audit left bad files
    out, in one process outside training (evaluate, export, make_shards)."""
    return open_source(d, classes).audited()


def listed_images(d, split: str | None = None, labelled: bool = True) -> ListedImages:
    """The images of `split` of the source `d` describes, for predict and evaluate."""
    return open_source(d).listed(split, labelled)


__all__ = ["FILES", "Feed", "ImageStore", "ListedImages", "SOURCES", "SUBMISSION_COLUMNS", "Source", "TrainingImages",
           "audited_splits", "describe_source", "file_ids", "label_names", "listed_images", "load_splits",
           "open_hf_dataset", "open_listing", "open_source", "read_csv_rows", "register", "source_reads"]
