"""Take a trained classifier out of its run: ONNX, a timm Hub-format folder, or both, checked
before anything is written. All of `launch/export.py` after its arguments are parsed.

Order: read the checkpoint -> refuse what cannot be exported -> gather the images the export is
checked on (the run's validation split as training saw it, when its data is here, or --images)
and evaluate the model on them for the model card -> write every file into a temporary
folder -> check the ONNX graph with onnxruntime against PyTorch -> rename the folder into place
-> push, if asked. A refusal or a failed check leaves no folder behind; an existing folder is
never written into.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.errors import UsageError
from data.files import (atomic_folder, atomic_write_json, atomic_write_text, sha256_file, write_failed,
                        write_fault_in)
from data.images import DEFAULT_MAX_PIXELS
from data.sources import FILES, ImageStore, open_source
from trainer.inference.evaluate import labelled_listed, report_of, run_config
from trainer.export.hub_folder import INTERPOLATION, hub_refusal, push_folder, write_hub_files
from trainer.inference.predict import InferenceOptions, collect_images, predict_files, reachable_run_config
from trainer.export.model_card import CardFacts, headline, model_card
from trainer.files.model_file import LoadedClassifier, load_classifier
from trainer.export.onnx_file import OnnxCheck, check_onnx, export_onnx, metadata_of
from trainer.task.task import task_for, task_of

FORMATS = ("onnx", "hub", "both")
ONNX_NAME, CARD_NAME, RECORD_NAME = "model.onnx", "README.md", "export.json"
CHECK_IMAGES = 32  # images the ONNX graph is compared on: enough to cover every class of a small run


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: str
    out: str
    format: str = "both"
    images: tuple[str, ...] = ()  # files or folders to check the ONNX graph on (default: the run's val split)
    data_root: str | None = None  # where the run's images are now, if they moved
    push: str | None = None  # a Hub repo id
    private: bool = False
    device: str = "auto"  # for the evaluation behind the model card

    def check(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r}: use one of {', '.join(FORMATS)}")
        out = Path(self.out).expanduser()
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise UsageError(f"--out {out} already exists and is not an empty folder; an export never writes "
                             f"into one: choose a new --out")
        if self.push and self.format == "onnx":
            raise UsageError("--push uploads the Hub-format folder: use it with --format hub or both")

    @property
    def formats(self) -> set[str]:
        return {"onnx", "hub"} if self.format == "both" else {self.format}


@dataclass
class Evidence:
    """The real images the export is checked on, and what evaluating the model on them said."""

    images: torch.Tensor  # normalized (N, 3, H, W) float32, at most CHECK_IMAGES
    source: str
    evaluation: dict | None = None  # the task's evaluation report (Task.report) over the whole validation split
    class_counts: dict[str, dict[str, int]] | None = None
    layout: str = ""  # data.folders.Splits.layout, when the data was here


def export_checkpoint(request: ExportRequest) -> Path:
    """The export folder, complete and checked (see the module's docstring)."""
    request.check()
    loaded = load_classifier(request.checkpoint)
    meta = loaded.metadata
    if "hub" in request.formats:
        refusal = hub_refusal(meta["model_name"], meta["head"])
        if refusal:
            raise UsageError(refusal)
    evidence = gather_evidence(loaded, request)
    out = Path(request.out).expanduser().resolve()
    record = {"checkpoint": str(Path(request.checkpoint).resolve()), "sha256": sha256_file(request.checkpoint),
              "epoch": meta["epoch"], "model_name": meta["model_name"], "format": request.format,
              "checked_on": evidence.source}
    try:
        _write_folder(out, loaded, request, evidence, record)
    except Exception as e:  # a full disk is the machine's fault (exit 1), not bad input or the model's
        fault = write_fault_in(e)  # (safetensors and the ONNX exporter wrap it in their own types)
        if fault is None:
            raise
        raise write_failed(out, fault, "nothing was left behind; {remedy} (or choose another --out) and "
                                       "export again") from None
    _print_summary(out, record, evidence)
    if request.push:
        print(f"pushed to {push_folder(out, request.push, request.private)}")
    return out


def _write_folder(out: Path, loaded: LoadedClassifier, request: ExportRequest, evidence: Evidence,
                  record: dict) -> None:
    """Every file of the export, checked, into a temporary folder that then becomes `out`."""
    with atomic_folder(out) as folder:
        card = _card_facts(loaded, request, evidence)
        if "onnx" in request.formats:
            check = _write_onnx(loaded, folder / ONNX_NAME, record, evidence.images)
            card.onnx_check = record["onnx_check"] = check.summary()
        if "hub" in request.formats:
            card.preprocessing_notes = write_hub_files(loaded, folder)
            record["preprocessing_notes"] = card.preprocessing_notes
        card.files = sorted([p.name for p in folder.iterdir()] + [CARD_NAME, RECORD_NAME])
        atomic_write_text(folder / CARD_NAME, model_card(card))
        atomic_write_json(folder / RECORD_NAME, record, indent=2)


def _write_onnx(loaded: LoadedClassifier, path: Path, record: dict, images: torch.Tensor) -> OnnxCheck:
    name = loaded.metadata["model_name"]
    source = {k: record[k] for k in ("checkpoint", "sha256", "epoch")}
    metadata = metadata_of(name, list(loaded.class_names), _preprocessing(loaded), source,
                           task_of(loaded.metadata), loaded.metadata)
    export_onnx(loaded.model, loaded.image_size, path, metadata, name)
    return check_onnx(path, loaded.model, images)


def _preprocessing(loaded: LoadedClassifier) -> dict:
    return loaded.preprocessing.to_dict() | {"interpolation": INTERPOLATION}


def gather_evidence(loaded: LoadedClassifier, request: ExportRequest) -> Evidence:
    """Images to check on: --images, else the run's validation split (evaluated whole for the card)
    when its data is here, else random inputs with a note. Bad --images fail here."""
    p = loaded.preprocessing
    if request.images:
        paths = collect_images(list(request.images))[:CHECK_IMAGES]
        return Evidence(_load(p, paths), f"{len(paths)} image(s) from {', '.join(request.images)}")
    # --data-root named: a wrong folder is an error; the recorded root missing here is a note below
    cfg = (run_config(loaded.metadata, request.data_root) if request.data_root
           else reachable_run_config(loaded.metadata))
    if cfg is None:
        print("note: the run's images are not here (pass --images FOLDER or --data-root): the ONNX graph is "
              "checked on random inputs and the model card has no per-class table", file=sys.stderr)
        return Evidence(torch.randn(8, 3, p.image_size, p.image_size, generator=torch.Generator().manual_seed(0)),
                        "8 random inputs")
    source = open_source(cfg.data, loaded.class_names)  # the checkpoint's class order wins
    if source.classes != loaded.class_names:
        raise UsageError(f"the classes in {cfg.data.root} ({', '.join(source.classes[:8])}) are not the "
                         f"checkpoint's ({', '.join(loaded.class_names[:8])}); pass --data-root with the run's "
                         f"own image folder, or --images")
    # The split training saw: the same images, after the same audit.
    files = labelled_listed(source.own_split("val"), loaded.class_names, not task_for(cfg).one_class_per_image)
    splits = source.audited()
    options = InferenceOptions(batch_size=cfg.data.batch_size, device=request.device)
    report = report_of(loaded, files, predict_files(loaded, files.paths, options, store=files.store))
    loaded.model.cpu()  # predict_files may have moved it to the GPU; the export runs on the CPU
    picked = _spread(files.paths, CHECK_IMAGES)
    counts = {"train": splits.class_counts("train"), "val": splits.class_counts("val")}
    return Evidence(_load(p, picked, files.store), f"{len(picked)} images of {files.source}", report, counts,
                    splits.layout)


def _spread(paths: list[Path], count: int) -> list[Path]:
    """`count` paths evenly over the list: the split is sorted by class, so every class shows up."""
    if len(paths) <= count:
        return list(paths)
    return [paths[i * len(paths) // count] for i in range(count)]


def _load(p, paths: list[Path], store: ImageStore = FILES) -> torch.Tensor:
    """The images as the model takes them, read by `store` (files, or a source's references)."""
    reader, images = store.with_transform(p.eval_transform()), []
    for path in paths:
        try:
            images.append(p.normalize(reader.load(str(path), DEFAULT_MAX_PIXELS)))
        except Exception as e:  # any decoder failure
            raise UsageError(f"cannot read {path} to check the export on ({type(e).__name__}: {e}); "
                             f"leave it out of --images") from None
    return torch.stack(images)


def _card_facts(loaded: LoadedClassifier, request: ExportRequest, evidence: Evidence) -> CardFacts:
    meta = loaded.metadata
    return CardFacts(meta["model_name"], list(loaded.class_names), Path(request.checkpoint).name, meta["epoch"],
                     meta.get("metrics", {}), meta.get("config", {}), _preprocessing(loaded),
                     class_counts=evidence.class_counts, data_layout=evidence.layout, evaluation=evidence.evaluation,
                     evaluation_source=evidence.source.split(" of ", 1)[-1], repo_id=request.push,
                     thresholds=task_of(meta).recorded(meta).get("thresholds"))


def _print_summary(out: Path, record: dict, evidence: Evidence) -> None:
    if "onnx_check" in record:
        print(record["onnx_check"])
    for note in record.get("preprocessing_notes", []):
        print(f"note: timm's eval transform differs from this run's: {note}", file=sys.stderr)
    if evidence.evaluation is not None:
        e = evidence.evaluation
        print(f"evaluated for the model card: {headline(e)} on {e['images']} images")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
