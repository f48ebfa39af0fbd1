"""The README.md model card of an exported classifier: what it is, how to use it, what it was
trained and measured on, and where it stops being trustworthy. Markdown with the Hub's YAML
front matter; every figure comes from the checkpoint or from the evaluation the export ran."""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.schema import dump_toml
from data.sources import describe_source

SMALL_CLASS = 20  # fewer validation images than this: a class's figures move by 5 points per image


@dataclass
class CardFacts:
    model_name: str
    class_names: list[str]
    checkpoint: str  # its file name and sha256, for provenance
    epoch: int
    metrics: dict  # the checkpoint's own, of that epoch
    config: dict  # Config.to_dict() of the run
    preprocessing: dict  # Preprocessing.to_dict() + interpolation
    preprocessing_notes: list[str] = field(default_factory=list)  # where timm's transform differs
    class_counts: dict[str, dict[str, int]] | None = None  # split -> class -> images, when the data was here
    data_layout: str = ""  # "split-folders" (train/ and val/ folders) or "class-folders" (split by fraction)
    evaluation: dict | None = None  # trainer.task.task.Task.report of the validation split
    evaluation_source: str = ""
    onnx_check: str = ""  # OnnxCheck.summary(), when ONNX was written
    files: list[str] = field(default_factory=list)
    repo_id: str | None = None
    thresholds: list[float] | None = None  # multi-label: per class, chosen on validation


def headline(e: dict) -> str:
    """An evaluation report's summary: accuracy and macro F1, or (multi-label) mAP and F1."""
    if "map" in e:
        return f"mAP {e['map']:.4f}, micro F1 {e['micro_f1']:.4f}, macro F1 {e['macro_f1']:.4f}"
    return f"accuracy {e['accuracy']:.4f}, macro F1 {e['macro_f1']:.4f}"


def model_card(f: CardFacts) -> str:
    parts = [_front_matter(f), _title(f), _usage(f), _data(f), _training(f), _evaluation(f),
             _preprocessing(f), _limits(f)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _front_matter(f: CardFacts) -> str:
    lines = ["---", "tags:", "- image-classification", "- imgtrain"]
    if f.model_name.startswith("timm/"):
        lines[1:1] = ["library_name: timm"]
        lines.append("- timm")
    if "onnx" in " ".join(f.files):
        lines.append("- onnx")
    return "\n".join([*lines, "pipeline_tag: image-classification", "---", ""])


def _title(f: CardFacts) -> str:
    names = ", ".join(f"`{n}`" for n in f.class_names[:12]) + (", ..." if len(f.class_names) > 12 else "")
    arch = f.model_name.split("/", 1)[-1]
    pretrained = f.config.get("model", {}).get("pretrained")
    start = "from pretrained weights" if pretrained or f.config.get("model", {}).get("weights") else "from scratch"
    return (f"# {arch} image classifier ({len(f.class_names)} classes)\n\n"
            f"`{f.model_name}` trained {start} with imgtrain to tell apart {len(f.class_names)} classes: {names}.\n"
            f"Exported from `{f.checkpoint}` (epoch {f.epoch}). Files: {', '.join(f'`{x}`' for x in f.files)}.\n")


def _usage(f: CardFacts) -> str:
    where = f"hf-hub:{f.repo_id}" if f.repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    out = ["## How to use", ""]
    if "config.json" in f.files:
        out += ["With timm (the preprocessing and label names come from `config.json`):", "", "```python",
                "import timm, torch", "from PIL import Image", "",
                f'model = timm.create_model("{where}", pretrained=True).eval()',
                "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
                'image = Image.open("photo.jpg").convert("RGB")',
                *(_multilabel_use() if f.thresholds else
                  ["probs = model(transform(image).unsqueeze(0)).softmax(1)[0]",
                   'print(model.pretrained_cfg["label_names"][int(probs.argmax())], float(probs.max()))']),
                "```", ""]
    if "model.onnx" in f.files:
        size = f.preprocessing["image_size"]
        out += ["With onnxruntime (input `images`: float32, batch x 3 x H x W, normalized as below; output "
                "`logits`; the class names and preprocessing are in the file's metadata):", "", "```python",
                "import json, numpy as np, onnxruntime", "",
                'session = onnxruntime.InferenceSession("model.onnx")',
                'meta = session.get_modelmeta().custom_metadata_map',
                'names = json.loads(meta["class_names"])',
                f"batch = np.zeros((1, 3, {size}, {size}), np.float32)  # your preprocessed images",
                'logits = session.run(["logits"], {"images": batch})[0]',
                "print([names[i] for i in logits.argmax(1)])", "```", ""]
    return "\n".join(out)


def _multilabel_use() -> list[str]:
    return ["# multi-label: a sigmoid per class, each against its own threshold (config.json's imgtrain.thresholds)",
            "import json, pathlib",
            'thresholds = json.loads(pathlib.Path("config.json").read_text())["imgtrain"]["thresholds"]',
            "scores = model(transform(image).unsqueeze(0)).sigmoid()[0]",
            'print([n for n, s, t in zip(model.pretrained_cfg["label_names"], scores, thresholds) if s >= t])']


def _data(f: CardFacts) -> str:
    data = f.config.get("data", {})
    out = ["## Training data", ""]
    out.append(f"{_source_line(data, f.data_layout)}. Images the audit found broken or degenerate were left out.")
    if not f.class_counts:
        out += ["", "Class counts: not available (the run's images were not reachable when this was exported)."]
        return "\n".join(out) + "\n"
    splits = list(f.class_counts)
    out += ["", "| class | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits)]
    for name in f.class_names:
        out.append(f"| {name} | " + " | ".join(str(f.class_counts[s].get(name, 0)) for s in splits) + " |")
    out.append("| **all** | " + " | ".join(str(sum(f.class_counts[s].values())) for s in splits) + " |")
    return "\n".join(out) + "\n"


def _source_line(data: dict, layout: str) -> str:
    """What the run read (data.source) and where its validation images came from: the source's own words."""
    return describe_source(data, layout)


_SUMMARY_KEYS = (("model", "name"), ("model", "pretrained"), ("model", "freeze"), ("train", "epochs"),
                 ("data", "batch_size"), ("data", "image_size"), ("data", "augment"), ("optim", "name"),
                 ("optim", "lr"), ("optim", "scheduler"), ("optim", "weight_decay"), ("train", "precision"))


def _training(f: CardFacts) -> str:
    out = ["## Training", "", "| setting | value |", "| --- | --- |"]
    for section, key in _SUMMARY_KEYS:
        value = f.config.get(section, {}).get(key)
        if value is not None:
            out.append(f"| `{section}.{key}` | `{value}` |")
    out += ["", "<details><summary>The whole resolved config</summary>", "", "```toml",
            dump_toml(f.config).rstrip(), "```", "", "</details>", ""]
    return "\n".join(out)


def _evaluation(f: CardFacts) -> str:
    out = ["## Evaluation", ""]
    recorded = ", ".join(f"{k} {v:.4f}" for k, v in sorted(f.metrics.items())
                         if isinstance(v, (int, float)) and k.startswith(("val_", "train_")))
    if recorded:
        out.append(f"Recorded by training at epoch {f.epoch}: {recorded}.")
    e = f.evaluation
    if e is None:
        out += ["", "Per-class results: not measured (the run's validation images were not reachable at "
                    "export; `python launch/evaluate.py --checkpoint CHECKPOINT --split val` measures them)."]
    else:
        extra = [k for k in ("ap", "threshold") if k in next(iter(e["per_class"].values()))]  # multi-label
        out += ["", f"Measured at export on {f.evaluation_source} ({e['images']} images): {headline(e)}.", "",
                "| class | precision | recall | F1 | " + "".join(f"{k} | " for k in extra) + "images |",
                "| --- | ---: | ---: | ---: | " + "---: | " * len(extra) + "---: |"]
        for name, m in e["per_class"].items():
            cells = "".join(f"{m[k]:.4f} | " for k in extra)
            out.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {cells}{m['support']} |")
    if f.onnx_check:
        out += ["", f"ONNX check: {f.onnx_check}."]
    return "\n".join(out) + "\n"


def _preprocessing(f: CardFacts) -> str:
    p = f.preprocessing
    how = {"center": f"resize the short side to {p['image_size']}/{p['crop_pct']}, take the center "
                     f"{p['image_size']}x{p['image_size']}",
           "squash": f"resize the whole image to {p['image_size']}x{p['image_size']} (aspect ratio not kept)",
           "border": f"pad to a square, then resize to {p['image_size']}x{p['image_size']}"}[p["crop_mode"]]
    out = ["## Preprocessing", "",
           f"RGB; {how} ({p.get('interpolation', 'bilinear')}); scale to [0, 1]; subtract mean "
           f"{_floats(p['mean'])}, divide by std {_floats(p['std'])}."]
    out += [f"- Note: {n}." for n in f.preprocessing_notes]
    return "\n".join(out) + "\n"


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _limits(f: CardFacts) -> str:
    out = ["## Intended use and limits", "",
           f"- Intended for images like the training folder's, sorted into these {len(f.class_names)} classes. "
           f"It has no \"none of these\" answer: every image gets one of them, however unrelated.",
           "- The figures above come from a validation split of the same folder as the training images. "
           "Images from other cameras, places, seasons or people can score lower; check on your own.",
           "- It inherits whatever the training images over- or under-represent."]
    e = f.evaluation
    if e is not None:
        small = [n for n, m in e["per_class"].items() if m["support"] < SMALL_CLASS]
        if small:
            out.append(f"- Fewer than {SMALL_CLASS} validation images for {len(small)} class(es) "
                       f"({', '.join(small[:8])}{', ...' if len(small) > 8 else ''}): their figures are rough.")
        weakest = min(e["per_class"].items(), key=lambda kv: kv[1]["f1"])
        out.append(f"- Weakest class on validation: {weakest[0]} (F1 {weakest[1]['f1']:.4f}).")
    return "\n".join(out) + "\n"
