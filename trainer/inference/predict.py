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
from data.sources import FILES, ImageStore, ListedImages, open_listing, open_source
from data.transforms import flips_horizontally
from trainer.files.model_file import LoadedClassifier, load_classifier


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


def is_multilabel(loaded: LoadedClassifier) -> bool:
    """A checkpoint of data.task = multilabel: independent sigmoid scores, not one softmax."""
    return loaded.metadata.get("task") == "multilabel"


def thresholds_of(loaded: LoadedClassifier) -> torch.Tensor:
    """A multi-label checkpoint's per-class thresholds (chosen on its validation split), else 0.5 each."""
    recorded = loaded.metadata.get("thresholds")
    return torch.tensor(recorded if recorded else [0.5] * len(loaded.class_names), dtype=torch.float64)


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
    scores = torch.sigmoid if is_multilabel(loaded) else (lambda logits: logits.softmax(1))
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


def prediction_rows(preds: FilePredictions, class_names: list[str], top_k: int,
                    kaggle: bool = False) -> tuple[list[str], list[list]]:
    """(header, rows) of the predictions CSV: `path, class, probability, topK, error`, or Kaggle's
    `Id, Class` (file name, class index). Failed files keep their row, with an empty prediction."""
    k = min(top_k, len(class_names))
    rows = []
    for i, path in enumerate(preds.paths):
        if i in preds.errors:
            rows.append([path.name, ""] if kaggle else [str(path), "", "", "", preds.errors[i]])
            continue
        top = preds.probs[i].topk(k)
        best = top.indices[0].item()
        if kaggle:
            rows.append([path.name, best])
        else:
            listing = ";".join(f"{class_names[c]}:{p:.4f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
            rows.append([str(path), class_names[best], f"{top.values[0].item():.6f}", listing, ""])
    header = ["Id", "Class"] if kaggle else ["path", "class", "probability", f"top{k}", "error"]
    return header, rows


def multilabel_rows(preds: FilePredictions, class_names: list[str], thresholds: torch.Tensor,
                    top_k: int) -> tuple[list[str], list[list]]:
    """(header, rows) for a multi-label checkpoint: `path, labels, scores, error`; labels are every
    class at or above its threshold (';'-separated, highest score first, possibly none), scores the
    top_k classes' "name:score"."""
    k = min(top_k, len(class_names))
    rows = []
    for i, path in enumerate(preds.paths):
        if i in preds.errors:
            rows.append([str(path), "", "", preds.errors[i]])
            continue
        p = preds.probs[i]
        order = p.argsort(descending=True).tolist()
        called = [class_names[c] for c in order if p[c].double() >= thresholds[c]]
        listing = ";".join(f"{class_names[c]}:{p[c].item():.4f}" for c in order[:k])
        rows.append([str(path), ";".join(called), listing, ""])
    return ["path", "labels", f"scores_top{k}", "error"], rows


def listed_source(meta: dict, listing: Listing, labelled: bool = True) -> ListedImages:
    """`--csv FILE` (paths relative to --data-root, else the CSV's folder; the run's column names),
    `--hf DIR` or `--shards DIR`: the images they list, read with the run's data config
    (`labelled`: evaluate)."""
    kind, path, split = listing.named_source
    d = config_from_dict(meta.get("config") or {}).data
    return open_listing(d, kind, path, listing.data_root).listed(split, labelled)


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
                   top_k: int = 5, kaggle: bool = False, listing: Listing = Listing()) -> FilePredictions:
    """predict.py: every image under `inputs` (or every image a CSV, a dataset or a shards split
    lists) -> one CSV row each (a shard sample's path: its `SHARD.tar#KEY` reference), written
    atomically to `out`; a summary line on stdout, unreadable files listed on stderr."""
    options.check()
    listing.check()
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    loaded = load_classifier(checkpoint)
    multilabel = is_multilabel(loaded)
    if multilabel and kaggle:
        raise UsageError("--kaggle writes one class index per image; this checkpoint is multi-label "
                         "(the default CSV has a labels column)")
    if bool(inputs) + listing.named != 1:
        raise UsageError("name images or folders, or one of --csv FILE / --hf DIR / --shards DIR")
    if inputs:
        paths, store, where = collect_images(inputs), FILES, ", ".join(inputs)
    else:
        listed = listed_source(loaded.metadata, listing, labelled=False)
        paths, store, where = listed.paths, listed.store, listed.source
    overlap = count_training_images(loaded.metadata, paths, store, listing.run_data_root)
    preds = predict_files(loaded, paths, options, store=store)
    if multilabel:
        header, rows = multilabel_rows(preds, loaded.class_names, thresholds_of(loaded), top_k)
    else:
        header, rows = prediction_rows(preds, loaded.class_names, top_k, kaggle)
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
    return preds
