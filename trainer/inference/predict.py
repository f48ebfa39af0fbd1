"""Run a checkpoint over image files: batched, multi-worker, CPU or GPU, bad files reported.

`predict_files` is what `launch/predict.py` and `launch/evaluate.py` (via trainer.inference.evaluate) run;
`predict_to_csv` is all of predict.py after its arguments are parsed. Every image goes through the
checkpoint's own `Preprocessing` (the eval transform its validation used), flip TTA included. A
file that does not decode never stops the run: its row is marked failed with the reason, and
every other image still gets its prediction.

A source's images are read through its store (data.sources.ImageStore), as its run's validation
reads them: files, or the samples of tar shards (one positioned read of the image's bytes per
sample, at the offset index.json records), in the same map-style loader: the same workers,
batches, order and failed rows, and the same pixels. Streaming each tar instead would need its
own split of shards among workers and buys nothing here: the loader asks for samples in index
order, so each worker's reads already move forward through a shard.

Images that are training images of the checkpoint's run (the same file or sample, or a copy with
the same content) are counted and warned about, by predict and evaluate alike
(`count_training_images`, `warn_training_images`), when the run's data is here.
"""

from __future__ import annotations

import csv
import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from configs.errors import UsageError
from configs.schema import Config, config_from_dict
from data.files import atomic_write_text
from data.folders import IMAGE_EXTENSIONS, list_images
from data.images import DEFAULT_MAX_PIXELS
from data.sources import (FILES, SUBMISSION_COLUMNS, ImageStore, ListedImages, Source, file_ids, open_listing,
                          open_source)
from data.transforms import flips_horizontally
from trainer.files.model_file import LoadedClassifier, load_classifier
from trainer.task.task import task_of


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the model over files (not what it computes: that is the checkpoint's)."""

    batch_size: int | None = None  # None: 64, or the run's data.batch_size on its own split
    num_workers: int = 2
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    tta_flip: bool = False  # average with the horizontally mirrored image's probabilities

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.num_workers < 0:
            raise UsageError(f"--num-workers must be 0 or more (got {self.num_workers})")


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, plus every image under the folders named, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += list_images(path)
        elif path.is_file():
            found.append(path)  # named explicitly: tried even with an unusual extension
        else:
            raise UsageError(f"not a file or folder: {path}")
    if not found:
        raise UsageError(f"no images found in {', '.join(inputs)} (extensions tried: "
                         f"{'/'.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))})")
    return found


@dataclass(frozen=True)
class Listing:
    """A source named on the command line that lists the images (instead of files and folders):
    --csv FILE, --hf DIR [--hf-split S] or --shards DIR [--shards-split S]."""

    csv: str | None = None
    hf: str | None = None
    hf_split: str | None = None
    shards: str | None = None
    shards_split: str | None = None
    data_root: str | None = None  # --csv's paths are relative to it (else to the CSV's folder)

    @property
    def named(self) -> int:
        """How many of --csv, --hf and --shards were given."""
        return sum(x is not None for x in (self.csv, self.hf, self.shards))

    @property
    def name(self) -> str:
        return Path(self.csv or self.hf or self.shards or "").name

    @property
    def named_source(self) -> tuple[str, str, str | None]:
        """(data.source kind, path, split) of the one source named."""
        named = [(kind, path, split) for kind, path, split in (("csv", self.csv, None), ("hf", self.hf, self.hf_split),
                                                                ("shards", self.shards, self.shards_split))
                 if path is not None]
        return named[0]

    @property
    def run_data_root(self) -> str | None:
        """--data-root as the run's data root: with --csv it is where the CSV's paths are instead."""
        return None if self.csv is not None else self.data_root

    def check(self) -> None:
        for name, split, folder in (("hf", self.hf_split, self.hf), ("shards", self.shards_split, self.shards)):
            if split is not None and folder is None:
                raise UsageError(f"--{name}-split {split} is a split of --{name} DIR: name the folder too")


class TolerantImageDataset(Dataset):
    """(image, index, error): a blank image and the decoding error for a file that fails."""

    def __init__(self, paths: list[Path], transform: Callable, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.transform, self.image_size, self.max_pixels = paths, transform, image_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform.load(str(self.paths[index]), self.max_pixels), index, ""
        except Exception as e:  # any decoder failure: truncated, not an image, unsupported mode
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), index, f"{type(e).__name__}: {e}"


@dataclass
class FilePredictions:
    """Softmax probabilities (multi-label: per-class sigmoid scores) for a list of image files, and
    why the failed ones failed."""

    paths: list[Path]
    probs: torch.Tensor  # (N, C); rows of failed files are NaN
    errors: dict[int, str] = field(default_factory=dict)  # index in paths -> decoding error
    flip_tta: bool = False  # whether mirrored images were averaged in

    @property
    def ok(self) -> torch.Tensor:
        return ~torch.isnan(self.probs[:, 0])


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


@torch.no_grad()
def predict_files(loaded: LoadedClassifier, paths: list[Path], options: InferenceOptions = InferenceOptions(),
                  max_pixels: int = DEFAULT_MAX_PIXELS, store: ImageStore = FILES) -> FilePredictions:
    """Softmax probabilities (multi-label checkpoints: sigmoid scores) for every image of `paths`
    (read by `store`: files, or a source's references), in fp32 and eval mode, through the
    checkpoint's eval transform; with `options.tta_flip` averaged with the mirrored image's."""
    device = pick_device(options.device)
    tta_flip = options.tta_flip and flip_tta_fits(loaded)
    reader = store.with_transform(loaded.eval_transform())
    dataset = TolerantImageDataset(paths, reader, loaded.image_size, max_pixels)
    loader = DataLoader(dataset, batch_size=options.batch_size or 64, num_workers=options.num_workers,
                        shuffle=False, pin_memory=device.type == "cuda")
    model = loaded.model.to(device).eval()
    scores = task_of(loaded.metadata).scores  # softmax, or (multi-label) a sigmoid per class
    probs = torch.full((len(paths), len(loaded.class_names)), float("nan"))
    errors: dict[int, str] = {}
    for images, indices, problems in loader:
        good = torch.tensor([not p for p in problems], dtype=torch.bool)
        for i, problem in zip(indices.tolist(), problems):
            if problem:
                errors[i] = problem
        if not good.any():
            continue
        images = loaded.preprocessing.normalize(images[good].to(device, non_blocking=True))
        p = scores(model(images).float())
        if tta_flip:
            p = (p + scores(model(images.flip(-1)).float())) / 2
        probs[indices[good]] = p.cpu()
    return FilePredictions(paths, probs, errors, tta_flip)


def flip_tta_fits(loaded: LoadedClassifier) -> bool:
    """Flip TTA helps a model trained on mirrored images; one trained without flips (digits, text:
    left and right matter) reads a mirrored image as another class. Say so and do not flip."""
    data = loaded.metadata.get("config", {}).get("data", {})
    if not data or flips_horizontally(data.get("augment", "standard"), data.get("augment_ops", [])):
        return True
    print(f"note: --tta skipped: this model was trained without horizontal flips (data.augment = "
          f"'{data.get('augment')}'), so a mirrored image is not one it knows", file=sys.stderr, flush=True)
    return False


# ----------------------------------------------------------------------------------------------
# Kaggle submissions


KAGGLE_LABELS = ("name", "index")


@dataclass(frozen=True)
class KaggleForm:
    """What --kaggle asks for: one row per image, its id then its label (`label` "name": the class
    as the data names it; "index": its position in the checkpoint's sorted class list, the old
    form), or with `probabilities` one column per class. A sample submission's header names the
    columns and orders the classes."""

    label: str = "name"
    probabilities: bool = False
    sample_submission: str | None = None


@dataclass(frozen=True)
class KaggleSheet:
    """A KaggleForm resolved against a checkpoint: the header, and which class each probability
    column holds. Checked before any image is read."""

    header: list[str]
    label: str  # name | index | probabilities
    columns: list[int] = field(default_factory=list)  # the class index of each probability column


def kaggle_sheet(form: KaggleForm, loaded: LoadedClassifier, listing: Listing) -> KaggleSheet:
    """The columns of the submission: those the sample submission's header names, else the CSV's own
    file and label columns when predicting from --csv (the run's data.csv_file_column and
    data.csv_label_column), else `Id, Class`; probabilities: the id column, then the class names."""
    if form.label not in KAGGLE_LABELS:
        raise UsageError(f"--kaggle-label {form.label!r}: use one of {', '.join(KAGGLE_LABELS)}")
    names = loaded.class_names
    if not task_of(loaded.metadata).one_class_per_image and not form.probabilities:
        raise UsageError("--kaggle writes one class per image; this checkpoint is multi-label: write one score "
                         "column per class with --kaggle-probabilities (the default CSV has a labels column)")
    if form.sample_submission:
        header = _sample_submission_header(form.sample_submission)
        if form.probabilities:
            _check_class_columns(form.sample_submission, header[1:], names)
            return KaggleSheet(header, "probabilities", [names.index(c) for c in header[1:]])
        if len(header) != 2:
            raise UsageError(f"--sample-submission {form.sample_submission} has {len(header) - 1} columns after its "
                             f"id ({_few(header[1:])}): one per class; write them with --kaggle-probabilities")
        return KaggleSheet(header, form.label)
    source = listing_source(loaded.metadata, listing)
    id_column, label_column = source.submission_columns() if source else SUBMISSION_COLUMNS
    if form.probabilities:
        return KaggleSheet([id_column, *names], "probabilities", list(range(len(names))))
    return KaggleSheet([id_column, label_column], form.label)


def _sample_submission_header(path: str) -> list[str]:
    try:
        with open(Path(path).expanduser(), newline="", encoding="utf-8-sig") as f:
            header = [cell.strip() for cell in next(csv.reader(f), [])]
    except OSError as e:
        raise UsageError(f"--sample-submission {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--sample-submission {path} is not a UTF-8 text CSV ({e.reason} at byte {e.start})") from None
    if len(header) < 2 or not all(header):
        raise UsageError(f"--sample-submission {path}: its header ({','.join(header) or 'none'}) needs an id column "
                         f"and named columns after it")
    return header


def _check_class_columns(path: str, columns: list[str], class_names: list[str]) -> None:
    """The sample submission's class columns are the checkpoint's classes, each once, in any order."""
    unknown = [c for c in dict.fromkeys(columns) if c not in class_names]
    differences = [
        ("classes of the checkpoint it has no column for", [c for c in class_names if c not in columns]),
        ("columns that are no class of the checkpoint", unknown),
        ("columns named twice", sorted({c for c in columns if columns.count(c) > 1})),
    ]
    found = [f"{what}: {_few(names)}" for what, names in differences if names]
    if found:
        raise UsageError(f"--sample-submission {path}: its class columns are not the checkpoint's "
                         f"{len(class_names)} classes; " + "; ".join(found))


def _few(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def kaggle_ids(paths: list[Path], loaded: LoadedClassifier, listing: Listing) -> list[str]:
    """Each image's id as the source that listed it names it (Source.submission_ids: a --csv row's
    file cell as written, a shard sample's key), else the file name without its extension."""
    source = listing_source(loaded.metadata, listing)
    return source.submission_ids(paths) if source else file_ids(paths)


def kaggle_rows(preds: FilePredictions, class_names: list[str], ids: list[str],
                sheet: KaggleSheet) -> tuple[list[str], list[list]]:
    """(header, rows) of a Kaggle submission. A failed file keeps its row, with its cells empty."""
    rows = []
    for i, image_id in enumerate(ids):
        if i in preds.errors:
            rows.append([image_id] + [""] * (len(sheet.header) - 1))
        elif sheet.label == "probabilities":
            # %g keeps a 1e-07 from becoming 0: a log loss would read that as certainty.
            rows.append([image_id, *(f"{preds.probs[i, c].item():.6g}" for c in sheet.columns)])
        else:
            best = preds.probs[i].argmax().item()
            rows.append([image_id, class_names[best] if sheet.label == "name" else best])
    repeated = len(ids) - len(set(ids))
    if repeated:
        print(f"warning: {repeated} id(s) repeat in the submission (files of the same name in different folders)",
              file=sys.stderr)
    return sheet.header, rows


def listing_source(meta: dict, listing: Listing) -> Source | None:
    """The source `--csv FILE` (paths relative to --data-root, else the CSV's folder), `--hf DIR` or
    `--shards DIR` names, read with the settings of the checkpoint's run (its column names, its
    task); None when images are named as files and folders."""
    if not listing.named:
        return None
    kind, path, _ = listing.named_source
    return open_listing(config_from_dict(meta.get("config") or {}).data, kind, path, listing.data_root)


def listed_source(meta: dict, listing: Listing, labelled: bool = True) -> ListedImages:
    """The images the source named on the command line lists (`labelled`: evaluate)."""
    return listing_source(meta, listing).listed(listing.named_source[2], labelled)


def reachable_run_config(meta: dict, data_root: str | None = None) -> Config | None:
    """The config of the checkpoint's run when its data root is here (`data_root`: where it is now), else None."""
    cfg = config_from_dict(meta.get("config") or {})
    if data_root:
        cfg.data.root = str(Path(data_root).expanduser())
    if cfg.data.root and Path(cfg.data.root).expanduser().is_dir():
        return cfg
    return None


def training_images_among(paths: list[Path], cfg: Config, store: ImageStore = FILES) -> int:
    """How many of `paths` (read by `store`) the run of `cfg` trained on: the same file or sample,
    or a copy with the same content (data.sources.TrainingImages)."""
    return open_source(cfg.data).training_images().count_among(paths, store)


def count_training_images(meta: dict, paths: list[Path], store: ImageStore = FILES,
                          data_root: str | None = None) -> int | None:
    """How many of `paths` are training images of the checkpoint's run; None when its data is not
    here, or could not be read (a note says why: the check is lost, not the predictions)."""
    cfg = reachable_run_config(meta, data_root)
    if cfg is None:
        return None
    try:
        return training_images_among(paths, cfg, store)
    except UsageError as e:  # the run's data changed since
        print(f"note: could not check for the run's training images ({e})", file=sys.stderr)
        return None


def warn_training_images(count: int | None, total: int, where: str, consequence: str) -> None:
    """One warning line on stderr when some of the `total` images in `where` are training images."""
    if count:
        print(f"warning: {count} of {total} images in {where} were training images of this checkpoint (same file "
              f"or same content), {consequence}", file=sys.stderr)


def predict_to_csv(checkpoint: str | Path, inputs: list[str], out: str | Path, options: InferenceOptions, *,
                   top_k: int = 5, kaggle: KaggleForm | None = None, listing: Listing = Listing()) -> FilePredictions:
    """predict.py: every image under `inputs` (or every image a CSV, a dataset or a shards split
    lists) -> one CSV row each (a shard sample's path: its `SHARD.tar#KEY` reference), written
    atomically to `out`; a summary line on stdout, unreadable files listed on stderr. `kaggle`:
    a submission file instead (see KaggleForm)."""
    options.check()
    listing.check()
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    loaded = load_classifier(checkpoint)
    task = task_of(loaded.metadata)  # which columns: one class per image, or every class at its threshold
    sheet = kaggle_sheet(kaggle, loaded, listing) if kaggle else None
    if bool(inputs) + listing.named != 1:
        raise UsageError("name images or folders, or one of --csv FILE / --hf DIR / --shards DIR")
    left_out: list[dict] = []  # rows of --csv without a usable image: no row in `out`, said below
    if inputs:
        paths, store, where = collect_images(inputs), FILES, ", ".join(inputs)
    else:
        listed = listed_source(loaded.metadata, listing, labelled=False)
        paths, store, where, left_out = listed.paths, listed.store, listed.source, listed.problems
        if not paths and left_out:
            raise UsageError(f"none of the {len(left_out)} rows of {where} has a usable image, e.g. "
                             f"{left_out[0]['detail']}; its paths are relative to --data-root, else to the CSV's "
                             f"folder")
    overlap = count_training_images(loaded.metadata, paths, store, listing.run_data_root)
    preds = predict_files(loaded, paths, options, store=store)
    if sheet:
        header, rows = kaggle_rows(preds, loaded.class_names, kaggle_ids(paths, loaded, listing), sheet)
    else:
        header, rows = task.prediction_rows(preds, loaded.class_names, top_k, task.thresholds(loaded.metadata))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text.getvalue())
    print(f"wrote {out}: {len(paths) - len(preds.errors)} prediction(s) from {checkpoint} on "
          f"{pick_device(options.device)}" + (" with flip TTA" if preds.flip_tta else ""))
    warn_training_images(overlap, len(paths), where, "so their predictions say little about images it has not seen")
    if preds.errors:
        print(f"warning: {len(preds.errors)} file(s) could not be read and have no prediction:", file=sys.stderr)
        for i, problem in sorted(preds.errors.items()):
            print(f"  {paths[i]}: {problem}", file=sys.stderr)
    warn_rows_left_out(left_out, out, submission=sheet is not None)
    return preds


def warn_rows_left_out(problems: list[dict], out: Path, submission: bool, shown: int = 5) -> None:
    """The --csv rows that have no row in `out` (a missing file, a path outside the folder, a file
    listed twice): how many, of which kinds, and the first few with their line numbers."""
    if not problems:
        return
    kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(p["problem"] for p in problems).items())
    why = " (a submission with rows missing is usually refused)" if submission else ""
    print(f"warning: {len(problems)} row(s) of the CSV have no row in {out}{why}: {kinds}", file=sys.stderr)
    for problem in problems[:shown]:
        print(f"  {problem['detail']}", file=sys.stderr)
    if len(problems) > shown:
        print(f"  ... and {len(problems) - shown} more", file=sys.stderr)
