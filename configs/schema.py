"""The run configuration: a TOML file plus `key=value` overrides, typed and validated once.

The bottom layer of the project: it imports nothing of `data`, `models`, `trainer` or `launch`,
so every layer can read a Config. Rules that need those layers (augmentation op names,
fine-tuning combinations) are checked by `trainer.assemble.run_config.load_config`, which every entry point uses.

The schema is the dataclasses below. Each section is a table in the TOML file; each field is a
key. A field's type annotation decides how an override string is parsed, and `choices` in its
metadata restricts the allowed values. Every problem is reported as one `ConfigError` line that
names the key and what would work, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from configs.errors import ConfigError


# The ImageNet statistics: what `data.normalize = "imagenet"` means and what backbones without a
# pretrained config of their own are normalized with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Above this side one image is 200 MB as float32 before the model's first layer.
MAX_IMAGE_SIZE = 4096
# The longest string value a key takes: a path is no longer on Linux (PATH_MAX) and a name far
# shorter. A longer one is a mistake (a file's content pasted by `$(cat ...)`) that would be
# copied into config.toml, state.json and every model file's header. Free text gets more room.
MAX_STRING_CHARS = 4096
LONG_STRING_KEYS = {"wandb.notes": 65_536}  # a run's description, shown on its W&B page


def _choice(default: Any, choices: tuple, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _doc(default: Any, doc: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    root: str = _doc("", "image folder: split folders train/ val/ (test/) or one folder of class folders")
    val_fraction: float = _doc(0.2, "validation share when the root has no val/ folder")
    seed: int = _doc(0, "seed of the stratified train/validation split")
    image_size: int = _doc(224, "side of the square crop the model sees (8 to 4096; one image goes through the "
                                "model on the device before anything is written: a size it cannot take is "
                                "one line naming the smallest that works)")
    crop_pct: float = _doc(0.875, "eval resizes to image_size / crop_pct, then center-crops")
    batch_size: int | str = _doc(32, "images per process per step; auto: on CUDA the largest that fits with a "
                                     "margin (trainer/assemble/batch_size.py), 32 on CPU; config.toml records the number")
    num_workers: int | str = _doc("auto", "DataLoader worker processes per training process (auto: this "
                                          "machine's cores / processes on it, less one for the trainer; a "
                                          "number: at most the cores and what free memory holds at 512 MiB "
                                          "each, capped with a note)")
    prefetch_factor: int = _doc(4, "batches each worker keeps ready ahead of training")
    decode: str = _choice("auto", ("auto", "cpu", "cuda"),
                          "where training JPEGs are decoded: cpu (workers, at reduced DCT scale), cuda (nvjpeg, "
                          "batched, for when the cores cannot keep up); auto: cuda when a CUDA process has fewer "
                          "than 4 cores to itself")
    augment: str = _choice("standard", ("standard", "crop", "stretch", "square", "randaugment", "trivialaugment",
                                        "none"),
                           "standard: random resized crop + flip; crop: no flip; stretch: resize + flip; square: "
                           "pad to square + jitter + affine (campus seed); none: eval transform (data/transforms.py)")
    normalize: str = _choice("backbone", ("backbone", "imagenet", "custom", "dataset"),
                             "backbone: the model's pretrained config (ImageNet if it has none); dataset: the "
                             "training split's own mean/std, computed once and cached")
    mean: list[float] = _doc([], "per-channel mean when normalize = 'custom'")
    std: list[float] = _doc([], "per-channel std when normalize = 'custom'")
    augment_ops: list[str] = _doc([], "extra augmentations after the preset, e.g. [\"color_jitter(brightness=0.2)\", "
                                      "\"random_erasing(p=0.25)\"]; names in data/transforms.py OPS")
    mixup_alpha: float = _doc(0.0, "batch-level MixUp alpha (0: off)")
    cutmix_alpha: float = _doc(0.0, "batch-level CutMix alpha (0: off); with mixup, one of the two per batch")
    sampler: str = _choice("shuffle", ("shuffle", "balanced"),
                           "balanced: draw every class equally often (with replacement); epoch length unchanged")
    audit: str = _choice("on", ("on", "off"), "on: audit the folder (cached) before training and leave out bad files")
    audit_dir: str = _doc("", "where audit caches and reports live; empty: ~/.cache/imgtrain/audit")
    min_image_side: int = _doc(0, "audit: images with a side under this many pixels are left out; 0: only degenerate "
                                  "ones (a side under 8 px). Slivers (one side over 25x the other) are always left "
                                  "out; small images are kept and upsampled to data.image_size. (0 meant "
                                  "data.image_size // 4 before; an older config.toml or checkpoint gets a note)")
    max_image_pixels: int = _doc(89_478_485, "audit and loading: images with more pixels are decompression bombs "
                                             "(0: no limit)")
    leakage: str = _choice("warn", ("warn", "error"), "identical images in train and validation: warn or stop")
    source: str = _choice("folder", ("folder", "csv", "hf", "shards"),
                          "where samples come from (data.root is where the data lives): folder: class folders; "
                          "csv: data.csv lists file,label rows; hf: a Hugging Face dataset on disk "
                          "(save_to_disk, parquet or imagefolder); shards: tar shards written by "
                          "launch/make_shards.py")
    csv: str = _doc("", "source = csv: the CSV file (a relative path is in data.root)")
    csv_file_column: str = _doc("file", "source = csv: the column of image paths, relative to data.root")
    csv_label_column: str = _doc("label", "source = csv: the column of class names")
    csv_split_column: str = _doc("", "source = csv: a column of train/val/test per row (empty: split by "
                                     "data.val_fraction)")
    hf_image_column: str = _doc("image", "source = hf: the column holding the images")
    hf_label_column: str = _doc("label", "source = hf: the column holding the labels (a ClassLabel gives the "
                                         "class names)")
    shuffle_buffer: int = _doc(1000, "source = shards: samples in the seeded shuffle buffer of each loader worker")
    task: str = _choice("single", ("single", "multilabel"),
                        "single: one class per image; multilabel: any number of classes per image, from the CSV "
                        "source's label column as ';'-separated names (sigmoid outputs, BCE loss, mAP and F1)")


@dataclass
class ModelConfig:
    name: str = _doc("", "timm/<name>, torchvision/<name> or one of ours (simple_cnn)")
    pretrained: bool = _doc(False, "load the library's own pretrained weights (downloads)")
    weights: str = _doc("", "local weights file (.safetensors, or a .pth state dict)")
    freeze: str = _doc("none", "none: train everything; backbone: only the head; last_N (e.g. last_2): the head "
                               "and the backbone's last N stages/blocks")
    head: str = _choice("linear", ("linear", "mlp"), "mlp: Linear-ReLU-Dropout-Linear")
    head_hidden: int = _doc(512, "hidden width of the mlp head")
    head_dropout: float = _doc(0.5, "dropout of the mlp head")
    drop_path_rate: float = _doc(0.0, "stochastic depth: timm's drop_path_rate, torchvision's stochastic_depth_prob "
                                      "(efficientnet, efficientnet_v2, convnext); 0: the library's default "
                                      "(0 in timm; e.g. 0.2 for torchvision efficientnet); refused for models "
                                      "without it")
    bn: str = _choice("train", ("train", "frozen"),
                      "frozen: every BatchNorm keeps its statistics and affine parameters fixed (eval mode, "
                      "no gradient), whatever model.freeze says")


@dataclass
class OptimConfig:
    name: str = _choice("adamw", ("sgd", "adam", "adamw"))
    lr: float = _doc(1e-3, "peak learning rate")
    weight_decay: float = _doc(0.0, "decoupled for adamw, L2 for sgd and adam")
    momentum: float = _doc(0.9, "sgd momentum")
    nesterov: bool = _doc(False, "sgd nesterov momentum")
    scheduler: str = _choice("none", ("none", "step", "cosine"))
    step_size: int = _doc(7, "epochs between decays of the step scheduler")
    gamma: float = _doc(0.1, "decay factor of the step scheduler")
    warmup_epochs: float = _doc(0.0, "linear warm-up from 0 to optim.lr over these epochs, before any scheduler "
                                     "(with none: then constant, as transformers' constant_with_warmup); at most "
                                     "train.epochs")
    min_lr: float = _doc(0.0, "floor of the cosine schedule")
    backbone_lr_mult: float = _doc(1.0, "backbone learning rate = lr x this (discriminative learning rates); "
                                        "the head always gets lr")
    layer_decay: float = _doc(0.0, "layer-wise lr decay (e.g. 0.75): the backbone's layer i of L (input side "
                                   "first) gets x this^(L - i), the head the full rate; layers from timm's "
                                   "group_matcher, else the model.freeze units (0: off)")
    no_decay_norm_bias: bool = _doc(True, "with weight_decay > 0: no weight decay for biases, norm weights, other "
                                          "1-D parameters and timm's no_weight_decay() names (as timm)")


@dataclass
class TrainConfig:
    epochs: int = _doc(10, "passes over the training split")
    precision: str = _choice("auto", ("auto", "no", "bf16", "fp16"),
                             "auto: what `accelerate launch --mixed_precision` says, else no; any other value "
                             "wins over the launcher (a note says so); config.toml records what ran")
    seed: int = _doc(0, "seed of weights init, shuffling and augmentation")
    label_smoothing: float = _doc(0.0, "cross-entropy label smoothing")
    best_metric: str = _choice("val_loss", ("val_loss", "val_acc", "val_map"),
                               "metric that picks best.safetensors (and early stopping): val_loss (lower is "
                               "better); val_acc for data.task = single, val_map for multilabel (higher is better)")
    early_stopping_patience: int = _doc(0, "stop after this many epochs without a better best_metric (0: never)")
    log_every_steps: int = _doc(50, "every this many batches (and at each epoch's end): loss, lr and images/s "
                                    "to train_steps.jsonl and W&B, the progress bar's numbers, the non-finite "
                                    "loss check")
    progress_every_seconds: float = _doc(30.0, "when stdout is not a terminal (SLURM, nohup, a pipe): a progress "
                                               "line this often, in seconds (0: none)")
    class_weights: str = _choice("none", ("none", "balanced"),
                                 "balanced: loss weight n / (classes * n_class) per class, from the training split")
    grad_accum_steps: int = _doc(1, "batches whose gradients add up to one optimizer step")
    grad_clip_norm: float = _doc(0.0, "clip the gradients' total norm to this after unscaling (0: off)")
    unfreeze_at_epoch: int = _doc(0, "progressive unfreezing: only the head trains for this many epochs, then "
                                     "what model.freeze allows (0: off)")
    cache_features: bool = _doc(False, "frozen backbone + deterministic transform: compute backbone features "
                                       "once, train the head on them")
    feature_cache_dir: str = _doc("~/.cache/imgtrain/features", "where cached features are kept (shared by runs)")
    checkpoint_every_steps: int = _doc(0, "also write a resumable checkpoint every N optimizer steps (0: epoch ends only)")
    keep_last: int = _doc(2, "resumable checkpoints kept in run.dir/checkpoints, besides the best epoch's")
    global_batch_size: int = _doc(0, "with data.batch_size = auto: keep this global batch, the found batch per "
                                     "process topped up by train.grad_accum_steps (0: the found batch as it is)")
    ema_decay: float = _doc(0.0, "keep an exponential moving average of the weights, this decay per optimizer "
                                 "step (0: off; e.g. 0.9998, or 0.99-0.999 for a few hundred steps), evaluated "
                                 "beside them each epoch (ema_val_acc); best.safetensors takes the better")
    ema_warmup: bool = _doc(True, "EMA decay min(train.ema_decay, (1 + n) / (10 + n)) at update n, so the start "
                                  "fades within the first steps")


@dataclass
class RuntimeConfig:
    device: str = _choice("auto", ("auto", "cpu", "cuda"), "auto: CUDA when a GPU is visible, else CPU")
    parallel: str = _choice("auto", ("auto", "ddp", "dp"),
                            "auto/ddp: one process per device, as launched; dp: nn.DataParallel over the "
                            "GPUs one process sees")
    sync_bn: bool = _doc(False, "synchronize BatchNorm statistics across processes (CUDA DDP only)")
    cpu_threads: int = _doc(0, "torch threads per process (0: CPU cores / processes on this machine)")
    channels_last: bool | str = _doc("auto", "NHWC memory format for model and images (auto: on CUDA, where "
                                              "convolutions run faster in it; off on CPU)")
    cudnn_benchmark: bool | str = _doc("auto", "let cuDNN time its algorithms for the run's shapes (auto: on "
                                                "with CUDA; false: the same algorithms every run, for bit-exact reruns on a GPU)")
    compile: bool = _doc(False, "torch.compile the model (inductor); slow first steps")
    ddp_timeout: float = _doc(300.0, "seconds a process waits for the others at a collective (gradient "
                                     "all-reduce, barrier) before the run ends in one line naming the rank that "
                                     "stopped answering (torch's own: 30 min over gloo); raise it for a "
                                     "process that is slow, not stuck (torch.compile's first steps of a large "
                                     "model, checkpoints on a slow disk)")
    grad_checkpointing: bool = _doc(False, "recompute activations in the backward pass (timm models' "
                                           "set_grad_checkpointing): less activation memory, one more forward "
                                           "pass of the blocks per step")


@dataclass
class RunConfig:
    dir: str = _doc("runs/default", "where checkpoints, config and logs go")
    resume: str = _doc("", "'auto': continue from the newest complete checkpoint in run.dir (or start fresh); "
                           "a path: from that checkpoint folder; '': start fresh")


@dataclass
class WandbConfig:
    mode: str = _choice("disabled", ("online", "offline", "disabled"))
    project: str = _doc("imgtrain", "W&B project")
    entity: str = _doc("", "W&B entity (team or user); empty: your default")
    name: str = _doc("", "W&B run name; empty: W&B picks one")
    group: str = _doc("", "W&B group")
    tags: list[str] = _doc([], "W&B tags")
    notes: str = _doc("", "W&B notes")
    log_model: bool = _doc(False, "log best.safetensors (with its metadata) as a W&B model artifact at the end")
    init_timeout: float = _doc(60.0, "seconds to wait for the W&B server before going on offline")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # What reading the file noticed (a key whose meaning changed since the file was written), for the
    # start summary; not a key: to_dict, config.toml and checkpoints leave it out.
    read_notes: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# ----------------------------------------------------------------------------------------------
# Schema introspection


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _fields(section_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _fields(cls)]


def _field_type(section_cls: type, key: str) -> Any:
    return typing.get_type_hints(section_cls)[key]


def _auto_or(tp: Any) -> Any:
    """X for a field typed `X | str`: a value of type X, or the string "auto"."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) else ()
    return next((a for a in args if a is not str), None) if str in args else None


def _type_name(tp: Any) -> str:
    if _auto_or(tp) is not None:
        return f'{_type_name(_auto_or(tp))} or "auto"'
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _alias(names: str, *targets: str) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names.split(), targets)


# Names other tools use for a choice spelled otherwise here (PyTorch Lightning's precisions, torch's
# scheduler classes), compared lower-case without "-" and "_"; the targets that are choices of the
# key are suggested. A name with no counterpart (plateau, linear, rmsprop) gets the list alone.
_ALIASES = {
    **_alias("fp32 float32 float 32 32true full single none false off", "no", "none"),
    **_alias("bfloat16 bf16mixed bf16true", "bf16"),
    **_alias("float16 half 16 16mixed fp16mixed 16true fp16true", "fp16"),
    **_alias("mixed amp true yes on", "bf16", "fp16"),
    **_alias("onecycle onecyclelr", "cosine"),
    **_alias("cos cosinelr cosineannealing cosineannealinglr warmupcosine cosinewarmup", "cosine"),
    **_alias("steplr multistep multisteplr exponential exponentiallr exp", "step"),
    **_alias("constant constantlr fixed no", "none"),
    **_alias("sgdm momentum nesterov", "sgd"),
    **_alias("gpu cuda0 nvidia", "cuda"),
}
_ALIAS_NOTES = {**_alias("onecycle onecyclelr", " (with optim.warmup_epochs for one-cycle's warm-up)"),
                **_alias("multistep multisteplr", " (every optim.step_size epochs by optim.gamma)")}


def _suggest(word: str, candidates: list[str]) -> str:
    def plain(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    same = [c for c in candidates if plain(c) == plain(word)]  # AdamW -> adamw, FP16 -> fp16
    if same:
        return f"; did you mean '{same[0]}'?"
    named = [t for t in _ALIASES.get(plain(word), ()) if t in candidates]
    if named:
        note = "".join(_ALIAS_NOTES.get(plain(word), ()))
        return f"; did you mean {' or '.join(repr(t) for t in named)}{note}?"
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------------------------
# Values


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a TOML (or parsed override) value against the schema type, with int->float allowed."""
    if _auto_or(tp) is not None:
        return value if value == "auto" else _coerce(key, value, _auto_or(tp))
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return value
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _parse_override_value(key: str, raw: str, tp: Any) -> Any:
    """Parse the text after `=` the way its type asks: strings verbatim, the rest as TOML."""
    if _auto_or(tp) is not None:
        if raw.strip().strip("\"'") == "auto":
            return "auto"
        try:
            return _parse_override_value(key, raw, _auto_or(tp))
        except ConfigError:
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {raw!r}") from None
    if tp is str:
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            return raw[1:-1]
        return raw
    text = raw.strip()
    if tp is bool:
        text = text.lower()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {raw!r}") from None
    return _coerce(key, value, tp)


def _set(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {source}{_suggest(section, list(sections))}"
                          f" (sections: {', '.join(sections)})")
    fields = _fields(sections[section])
    dotted = f"{section}.{key}"
    if key not in fields:
        raise ConfigError(f"unknown key '{dotted}' in {source}{_suggest(dotted, all_keys())}")
    tp = _field_type(sections[section], key)
    value = _coerce(dotted, value, tp)
    _check_length(dotted, value)
    choices = fields[key].metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{dotted} = {value!r} is not one of: {', '.join(map(repr, choices))}"
                          f"{_suggest(str(value), list(choices))}")
    setattr(getattr(cfg, section), key, value)


def _check_length(key: str, value: Any) -> None:
    """Refuse a string (or a list's string item) longer than the key takes, naming the key and
    the limit and showing only the value's start."""
    limit = LONG_STRING_KEYS.get(key, MAX_STRING_CHARS)
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(item, str) and len(item) > limit:
            where = f"{key}[{i}]" if isinstance(value, list) else key
            fix = "shorten it" if key in LONG_STRING_KEYS else "give a path or a name, not a file's content"
            raise ConfigError(f"{where} is {len(item):,} characters long (it starts {item[:40]!r}); {key} takes at "
                              f"most {limit:,}: {fix}")


# ----------------------------------------------------------------------------------------------
# Loading


def read_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply `section.key=value` overrides, validate the
    schema's own rules. `trainer.assemble.run_config.load_config` adds the rules of the data and model layers."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config {path} is a folder; give a TOML file, e.g. configs/demo.toml")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file; --config takes a TOML file, "
                              f"e.g. configs/demo.toml") from None
        for section, table in tables.items():
            if not isinstance(table, dict):
                raise ConfigError(f"'{section}' in {path} must be a [section] table of keys"
                                  f"{_suggest(section, all_keys())}")
            for key, value in table.items():
                _set(cfg, section, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=3")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        if dotted.count(".") != 1:
            raise ConfigError(f"override key '{dotted}' must be section.key{_suggest(dotted, all_keys())}")
        section, key = dotted.split(".")
        sections = _sections()
        if section in sections and key in _fields(sections[section]):
            value = _parse_override_value(dotted, raw, _field_type(sections[section], key))
        else:
            value = raw  # _set reports the unknown key with a suggestion
        _set(cfg, section, key, value, "overrides")
    validate(cfg)
    if path is not None:
        cfg.read_notes = tuple(changed_meaning_notes(tables, str(path), cfg))
    return cfg


@dataclass(frozen=True)
class ChangedMeaning:
    """A value of a key that meant something else in an earlier version."""

    key: str  # section.key
    value: Any  # the value whose meaning changed
    before: str  # what it meant, formatted with the file's [data] table
    now: str  # what it means now
    same_as_before: str  # the setting that keeps the old meaning, formatted like `before`
    added_since: tuple[str, ...]  # every key the schema gained after the change


# A run writes every key of its version into config.toml and its checkpoints, so a file that holds
# every key the schema had at the change and none of those added since was written before it. (A
# hand-written file naming few keys is not taken for one.)
CHANGED_MEANINGS = (
    ChangedMeaning(
        "data.min_image_side", 0,
        before="images with a side under data.image_size // 4 ({quarter} px) were left out",
        now="only degenerate images (a side under 8 px) are left out; smaller ones are upsampled",
        same_as_before="data.min_image_side={quarter}",
        added_since=("data.csv", "data.csv_file_column", "data.csv_label_column", "data.csv_split_column",
                     "data.hf_image_column", "data.hf_label_column", "data.shuffle_buffer", "data.source",
                     "data.task", "model.bn", "model.drop_path_rate", "optim.layer_decay",
                     "optim.no_decay_norm_bias", "runtime.grad_checkpointing", "train.ema_decay", "train.ema_warmup",
                     "train.global_batch_size", "train.progress_every_seconds")),
)


def changed_meaning_notes(tables: dict, where: str, now: Config) -> list[str]:
    """A note for each key of `tables` (a config file's tables, or a checkpoint's recorded config)
    that an earlier version wrote with a value whose meaning has changed since, and that `now` (the
    run's config, overrides applied) still holds."""
    present = {f"{section}.{key}" for section, table in tables.items() if isinstance(table, dict) for key in table}
    notes = []
    for change in CHANGED_MEANINGS:
        section, key = change.key.split(".")
        at_change = set(all_keys()) - set(change.added_since)
        if (present & set(change.added_since) or not at_change <= present or tables[section][key] != change.value
                or getattr(getattr(now, section), key) != change.value):
            continue
        quarter = int(tables.get("data", {}).get("image_size", 224)) // 4
        notes.append(f"{where} was written by an earlier version, where {change.key} = {change.value!r} meant: "
                     f"{change.before.format(quarter=quarter)}; now {change.now}. To train on the same images as "
                     f"then, set {change.same_as_before.format(quarter=quarter)}")
    return notes


def config_from_dict(tables: dict) -> Config:
    """A Config from `Config.to_dict()` as a checkpoint records it. Lenient: keys this version does
    not know (a checkpoint from an older or newer version) are ignored and missing ones keep their
    defaults, so every checkpoint's config can be read back. Not a check of user input: that is
    `configs.schema.read_config`."""
    sections = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        known = {f.name for f in dataclasses.fields(cls)}
        values = tables.get(section.name) or {}
        sections[section.name] = cls(**{k: v for k, v in values.items() if k in known})
    return Config(**sections)


def validate(cfg: Config) -> None:
    """Cross-field and range checks; each names the key and what would work."""
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    if not d.root:
        raise ConfigError("data.root is not set: add data.root=/path/to/images (a folder of class folders, "
                          "or one with train/ and val/)")
    _check_run_dir(cfg.run.dir)
    if not m.name:
        raise ConfigError("model.name is not set: e.g. model.name=timm/resnet18 "
                          "(see `python launch/list_models.py --search resnet`)")
    checks = [
        (0.0 < d.val_fraction < 1.0, "data.val_fraction must be between 0 and 1 (exclusive)"),
        (d.image_size >= 8, "data.image_size must be at least 8"),
        (d.image_size <= MAX_IMAGE_SIZE, f"data.image_size must be at most {MAX_IMAGE_SIZE} px (got {d.image_size}): "
                                         "the crop every image is resized to, e.g. 224"),
        (0.0 < d.crop_pct <= 1.0, "data.crop_pct must be in (0, 1]"),
        (d.batch_size == "auto" or d.batch_size >= 1, 'data.batch_size must be at least 1, or "auto"'),
        (d.num_workers == "auto" or d.num_workers >= 0, 'data.num_workers must be 0 or more, or "auto"'),
        (d.prefetch_factor >= 1, "data.prefetch_factor must be at least 1"),
        (m.head_hidden >= 1, "model.head_hidden must be at least 1"),
        (0.0 <= m.head_dropout < 1.0, "model.head_dropout must be in [0, 1)"),
        (o.lr > 0, "optim.lr must be positive"),
        (o.weight_decay >= 0, "optim.weight_decay must be 0 or more"),
        (o.step_size >= 1, "optim.step_size must be at least 1"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs must be 0 or more"),
        (o.warmup_epochs <= t.epochs, f"optim.warmup_epochs ({o.warmup_epochs:g}) must be at most train.epochs "
                                      f"({t.epochs}), or the learning rate never reaches optim.lr"),
        (t.epochs >= 1, "train.epochs must be at least 1"),
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (t.early_stopping_patience >= 0, "train.early_stopping_patience must be 0 (off) or more"),
        (t.log_every_steps >= 1, "train.log_every_steps must be at least 1"),
        (t.progress_every_seconds >= 0, "train.progress_every_seconds must be 0 (off) or more"),
        (cfg.wandb.init_timeout > 0, "wandb.init_timeout must be a positive number of seconds"),
        (d.mixup_alpha >= 0, "data.mixup_alpha must be 0 (off) or more"),
        (d.cutmix_alpha >= 0, "data.cutmix_alpha must be 0 (off) or more"),
        (d.min_image_side >= 0, "data.min_image_side must be 0 (only degenerate images) or more"),
        (d.max_image_pixels >= 0, "data.max_image_pixels must be 0 (no limit) or more"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1 (1: no accumulation)"),
        (t.grad_clip_norm >= 0, "train.grad_clip_norm must be 0 (off) or a positive norm, e.g. 1.0"),
        (cfg.runtime.cpu_threads >= 0, "runtime.cpu_threads must be 0 (auto) or a positive count"),
        (cfg.runtime.ddp_timeout > 0, "runtime.ddp_timeout must be a positive number of seconds, e.g. 300"),
        (o.backbone_lr_mult > 0, "optim.backbone_lr_mult must be positive (to keep layers fixed use model.freeze)"),
        (0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate must be in [0, 1), e.g. 0.1"),
        (0.0 <= o.layer_decay <= 1.0, "optim.layer_decay must be 0 (off) or in (0, 1], e.g. 0.75"),
        (t.unfreeze_at_epoch >= 0, "train.unfreeze_at_epoch must be 0 (off) or more"),
        (t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be 0 (epoch ends only) or more"),
        (t.keep_last >= 1, "train.keep_last must be at least 1"),
        (0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1) (0: off; e.g. 0.9998)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_batch_target(cfg)
    _check_multilabel(cfg)
    if d.normalize == "custom":
        if len(d.mean) != 3 or len(d.std) != 3:
            raise ConfigError("data.normalize = 'custom' needs data.mean and data.std with 3 numbers each, "
                              "e.g. data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5]")
        if any(s <= 0 for s in d.std):
            raise ConfigError("data.std values must be positive")
    elif d.mean or d.std:
        raise ConfigError("data.mean/data.std are only used with data.normalize = 'custom'; set that too")
    if m.weights and m.pretrained:
        raise ConfigError("set either model.pretrained = true or model.weights = FILE, not both")
    if m.weights and Path(m.weights).expanduser().is_dir():
        raise ConfigError(f"model.weights {m.weights} is a folder; give the weights file in it (.safetensors, "
                          f"or a torch.save(model.state_dict(), FILE) file)")
    if m.weights and not Path(m.weights).expanduser().is_file():
        raise ConfigError(f"model.weights file not found: {m.weights}")


def _check_run_dir(run_dir: str) -> None:
    """The refusals that need no file system; trainer/files/run_lock.py checks the folder itself."""
    if not run_dir.strip():  # what `run.dir=$OUT` gives when OUT is unset: the current folder
        raise ConfigError("run.dir is empty (an unset shell variable?): give the run a folder of its own, "
                          "e.g. run.dir=runs/first")
    path = Path(run_dir).expanduser()
    if path.is_absolute() and path.parent == path:
        raise ConfigError(f"run.dir={run_dir} is the root folder: give the run a folder of its own, "
                          f"e.g. run.dir=runs/first")


def _check_batch_target(cfg: Config) -> None:
    t = cfg.train
    if t.global_batch_size < 0:
        raise ConfigError("train.global_batch_size must be 0 (none) or a positive number of images")
    if t.global_batch_size and cfg.data.batch_size != "auto":
        raise ConfigError("train.global_batch_size is kept with data.batch_size=auto; with a fixed data.batch_size "
                          "set train.grad_accum_steps instead")
    if t.global_batch_size and t.grad_accum_steps != 1:
        raise ConfigError("set train.global_batch_size or train.grad_accum_steps, not both: the accumulation is "
                          "derived from the global batch")


def _check_multilabel(cfg: Config) -> None:
    """What assumes one class per image does not apply to a multi-label run."""
    if cfg.data.task != "multilabel":
        return
    d, t = cfg.data, cfg.train
    single_only = [("data.mixup_alpha", d.mixup_alpha > 0), ("data.cutmix_alpha", d.cutmix_alpha > 0),
                   ("data.sampler=balanced", d.sampler == "balanced"),
                   ("train.class_weights=balanced", t.class_weights == "balanced"),
                   ("train.label_smoothing", t.label_smoothing > 0),
                   ("train.cache_features", t.cache_features)]
    named = [name for name, on in single_only if on]
    if named:
        raise ConfigError(f"{named[0]} is for one class per image, not data.task=multilabel; leave it at its "
                          f"default")
    if d.source != "csv":
        raise ConfigError("data.task=multilabel reads each image's labels from a CSV: set data.source=csv and "
                          "data.csv=FILE, its label column (data.csv_label_column) holding ';'-separated names")


# ----------------------------------------------------------------------------------------------
# Writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, table in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


__all__ = ["Config", "read_config", "validate", "dump_toml", "all_keys", "describe_keys", "KeyInfo", "key_infos"]


@dataclass(frozen=True)
class KeyInfo:
    """One key as the schema declares it: what `--keys` lists and docs/configuration.md tabulates."""

    key: str             # "section.key"
    type_name: str       # "int", "list[float]", 'int or "auto"'
    default: str         # as it is written in TOML: "auto" in quotes, [] for an empty list
    choices: tuple       # the allowed values, empty when any value of the type is allowed
    doc: str


def key_infos() -> list[KeyInfo]:
    """Every key in schema order, read from the dataclasses above (their annotations and metadata)."""
    infos = []
    for section, cls in _sections().items():
        for key, f in _fields(cls).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            infos.append(KeyInfo(f"{section}.{key}", _short_type(_field_type(cls, key)), _toml_value(default),
                                 tuple(f.metadata.get("choices", ())), f.metadata.get("doc", "")))
    return infos


def _short_type(tp: Any) -> str:
    if _auto_or(tp) is not None:
        return f'{_short_type(_auto_or(tp))} or "auto"'
    if typing.get_origin(tp) is list:
        return f"list[{_short_type(typing.get_args(tp)[0])}]"
    return tp.__name__


def describe_keys() -> str:
    """Every key with its default and meaning, one per line (for `launch/train.py --keys`)."""
    lines = []
    for info in key_infos():
        doc = f"{info.doc} [{' | '.join(info.choices)}]".strip() if info.choices else info.doc
        section, key = info.key.split(".", 1)
        lines.append(f"{section}.{key:<24} = {info.default:<14} {doc}")
    return "\n".join(lines)
