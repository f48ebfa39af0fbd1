"""One way to build a run: config -> split -> model -> audit -> transforms -> datasets -> loaders
-> optimizer -> schedule -> criterion.

The training loop, the LR finder, the overfit check, the batch grid and the evaluation of a run's
own split all call `build_run` (or, for the data alone, `data.sources.Source.audited`); none of
them assembles its own, so what the LR finder measures is what training sees. What differs by
data source (folder, CSV, dataset, tar shards: checks, audit, how samples are read, how training
batches are made) is asked of `data.sources.Source`, never decided here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from configs.schema import Config
from data import ImageListDataset, Preprocessing, Splits, make_loader, resolve_normalization, train_transform
from data.balance import BalancedDraw
from data.dataset import Loading
from data.device_decode import DeviceDecode, EncodedTransform, collate_encoded
from data.multilabel import MultiLabelSplits
from data.sampling import FinishedBatches
from data.sources import Feed, Source, open_source
from data.transforms import BatchFinish, batch_mixer, crop_mode_of
from models import BuiltModel, HeadSpec, build_classifier, enable_grad_checkpointing
from models.finetune import (FinetunePlan, GroupRules, apply_epoch, batchnorm_trains,
                             describe_groups, make_plan, param_groups, prepare_for_wrapping)
from trainer.assemble.batch_size import resolve_batch_size, step_probe
from trainer.assemble.feature_cache import cached_head_datasets
from trainer.assemble.optim import build_optimizer, build_scheduler
from trainer.assemble.process_group import main_process_first
from trainer.assemble.size_probe import check_image_size
from trainer.assemble.accelerator import channels_last_on, decode_on, sync_bn_on, worker_count
from trainer.task.task import task_for

# Below this many images per batch, BatchNorm's error rises steeply (Wu & He, Group Normalization, 2018).
SMALL_BN_BATCH = 16


def head_spec(cfg: Config) -> HeadSpec:
    return HeadSpec(cfg.model.head, cfg.model.head_hidden, cfg.model.head_dropout)


@dataclass
class RunData:
    """The audited split and the datasets built on it (images, not cached features)."""

    splits: Splits
    preprocessing: Preprocessing  # the eval transform every checkpoint records
    train_images: ImageListDataset  # training transform
    val_images: ImageListDataset  # eval transform
    failure_log: Path  # files that fail to decode mid-epoch are skipped and listed here
    after_normalize: list  # training ops that run on the device after normalization (random erasing)

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    @property
    def train_labels(self) -> list[int]:
        return [label for _, label in self.splits.train]


@dataclass
class RunParts:
    """Everything a run trains with, before `accelerator.prepare`."""

    cfg: Config
    data: RunData
    built: BuiltModel  # the whole classifier: what checkpoints hold, never wrapped
    plan: FinetunePlan
    model: nn.Module  # what trains: `built.model`, or its head alone on cached features
    train_loader: FinishedBatches  # the source's resumable batches (data.sources.Source.train_batches)
    val_loader: DataLoader
    optimizer: object
    scheduler: object
    criterion: nn.Module
    steps_per_epoch: int  # optimizer steps per epoch on this process count

    def enter_epoch(self, epoch: int) -> None:
        """What trains in `epoch` (model.freeze, train.unfreeze_at_epoch): a pure function of the epoch."""
        apply_epoch(self.built.model, self.plan, epoch)


def _audit(cfg: Config, source: Source, accelerator: Accelerator | None, backbone_stats):
    """(TrainingData, mean, std). With an accelerator, the main process audits first (all cores,
    writes the cache); the others then read the cached answer."""
    is_main = accelerator is None or accelerator.is_main_process
    say = accelerator.print if accelerator is not None else print
    if accelerator is None:
        prepared = source.training_data(True, say)
    else:
        with main_process_first(accelerator):  # the others wait for hours, not runtime.ddp_timeout
            prepared = source.training_data(is_main, say)
    d = cfg.data
    mean, std = resolve_normalization(d.normalize, *backbone_stats, prepared.mean or d.mean, prepared.std or d.std)
    return prepared, mean, std


def build_data(cfg: Config, accelerator: Accelerator, source: Source, built: BuiltModel) -> RunData:
    prepared, mean, std = _audit(cfg, source, accelerator, (built.mean, built.std))
    d = cfg.data
    preprocessing = Preprocessing(d.image_size, d.crop_pct, tuple(mean), tuple(std), crop_mode_of(d.augment))
    failure_log = Path(cfg.run.dir).expanduser().resolve() / "load_failures.jsonl"
    train_tf, after_normalize = train_transform(d.augment, d.image_size, d.crop_pct, d.augment_ops)
    train_samples, val_samples = prepared.splits.train, prepared.splits.val
    if isinstance(prepared.splits, MultiLabelSplits):  # multi-hot targets instead of one class index
        train_samples, val_samples = prepared.splits.targets(train_samples), prepared.splits.targets(val_samples)
    store = source.store  # how the source's paths are read: files, or tar members
    train_images = ImageListDataset(train_samples, store.with_transform(train_tf), failure_log, d.max_image_pixels)
    val_images = ImageListDataset(val_samples, store.with_transform(preprocessing.eval_transform()), failure_log,
                                  d.max_image_pixels)
    return RunData(prepared.splits, preprocessing, train_images, val_images, failure_log, after_normalize)


def build_run(cfg: Config, accelerator: Accelerator, classes: list[str] | None = None) -> RunParts:
    """Every part of a run, built once. Everything that can fail on user input fails here, before
    a file is written (the audit's cache and report aside). `classes`: the class order the
    checkpoint a run resumes recorded (it wins over data.class_order's rule)."""
    source = open_source(cfg.data, classes)
    source.check_training(cfg)
    splits = source.open_for_training(accelerator)
    m, o = cfg.model, cfg.optim
    built = build_classifier(m.name, len(splits.classes), head_spec(cfg), m.pretrained, m.weights, m.drop_path_rate)
    if cfg.runtime.grad_checkpointing:
        enable_grad_checkpointing(built)
    plan = make_plan(built.model, built.head_name, m.freeze, cfg.train.unfreeze_at_epoch, m.bn)
    # DDP registers the parameters that require grad when it wraps the model: all that ever train.
    prepare_for_wrapping(built.model, plan)
    # Before the audit and before anything is written: a size the model cannot take is one line.
    check_image_size(built, cfg.data.image_size, accelerator)
    data = build_data(cfg, accelerator, source, built)
    criterion = _criterion(cfg, accelerator, data)
    if cfg.data.batch_size == "auto":  # a number before any loader exists; config.toml records it
        _resolve_batch_size(cfg, accelerator, built, plan, criterion, data)

    loading = loading_for(cfg, accelerator)
    model, train_set, val_set = built.model, data.train_images, data.val_images
    if cfg.train.cache_features:  # fixed backbone: train only the head, on features computed once
        train_set, val_set, model = cached_head_datasets(accelerator, built, data, cfg, loading.num_workers)
        loading = Loading(0)  # the features are already in memory
    train_loader, val_loader = _loaders(cfg, accelerator, source, data, (train_set, val_set), loading)

    groups = param_groups(built.model, plan, o.lr, o.backbone_lr_mult, GroupRules.of(o))
    optimizer = build_optimizer(groups, o)
    _announce_recipe(cfg, accelerator, built, plan, groups)
    # len(train_loader) is this process's share of batches; with accumulation the optimizer steps
    # once per grad_accum_steps of them (and once more for a partial tail).
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, plan, steps_per_epoch, cfg.train.epochs)
    return RunParts(cfg, data, built, plan, model, train_loader, val_loader, optimizer, scheduler,
                    criterion, steps_per_epoch)


def _resolve_batch_size(cfg: Config, accelerator: Accelerator, built: BuiltModel, plan: FinetunePlan,
                        criterion: nn.Module, data: RunData) -> None:
    """data.batch_size = "auto": probe the real step (this model, this optimizer, this loss) on the device."""
    def make_optimizer(model: nn.Module):
        o = cfg.optim
        return build_optimizer(param_groups(model, plan, o.lr, o.backbone_lr_mult, GroupRules.of(o)), o)

    size, classes = cfg.data.image_size, len(data.classes)
    target = task_for(cfg).probe_target(classes)
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))  # the global RNG stays as it was
    try_step = step_probe(built.model, make_optimizer, criterion, accelerator, (image, target),
                          channels_last_on(cfg, accelerator))
    resolve_batch_size(cfg, accelerator, try_step, len(data.train_images))


def _announce_recipe(cfg: Config, accelerator: Accelerator, built: BuiltModel, plan: FinetunePlan,
                     groups: list[dict]) -> None:
    """One line on the parameter groups when layer decay or weight-decay exemptions split them; one
    warning when BatchNorm trains on small batches."""
    if cfg.optim.layer_decay or GroupRules.of(cfg.optim).splits_decay:
        accelerator.print(describe_groups(groups))
    if batchnorm_trains(built.model, plan):
        synced = sync_bn_on(cfg, accelerator)
        batch = cfg.data.batch_size * (accelerator.num_processes if synced else 1)
        if batch < SMALL_BN_BATCH:
            kind = "synchronized batches" if synced else "per-process batches"
            accelerator.print(f"warning: BatchNorm trains on {kind} of {batch}: its statistics will be noisy; "
                              f"consider model.bn=frozen or a larger batch")


def loading_for(cfg: Config, accelerator: Accelerator) -> Loading:
    """data.num_workers ("auto": this process's share of the cores; a number: at most what the
    machine allows, said in one note) and pinning (on CUDA)."""
    workers, note = worker_count(cfg.data.num_workers)
    if note and accelerator.is_main_process:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return Loading(workers, accelerator.device.type == "cuda", cfg.data.prefetch_factor)


def _loaders(cfg: Config, accelerator: Accelerator, source: Source, data: RunData,
             datasets: tuple[Dataset, Dataset], loading: Loading) -> tuple[FinishedBatches, DataLoader]:
    d, seed = cfg.data, cfg.train.seed
    # The epoch's whole draw; the training batches shard it across processes and can start it mid-way.
    draw = BalancedDraw(data.train_labels, seed=seed).indices if d.sampler == "balanced" else None
    train_set, train_loading, finish = datasets[0], loading, None
    if not cfg.train.cache_features:  # features need no normalizing
        decode = None
        if source.decodes_on_device and decode_on(cfg, accelerator) == "cuda":  # workers read bytes; nvjpeg decodes
            train_set, train_loading, decode = _device_decoding(data, loading, accelerator.device)
        finish = _batch_finish(cfg, accelerator, data, decode)
    train_loader = source.train_batches(train_set, Feed(d.batch_size, train_loading, seed, draw, finish), accelerator)
    return train_loader, make_loader(datasets[1], d.batch_size, loading, seed)


def _batch_finish(cfg: Config, accelerator: Accelerator, data: RunData, decode=None) -> BatchFinish:
    """uint8 worker batches -> what the model takes, on the device (normalize, erasing, MixUp/CutMix)."""
    d = cfg.data
    return BatchFinish(data.preprocessing.mean, data.preprocessing.std, data.after_normalize,
                       batch_mixer(len(data.classes), d.mixup_alpha, d.cutmix_alpha),
                       channels_last_on(cfg, accelerator), decode)


def _device_decoding(data: RunData, loading: Loading, device) -> tuple[Dataset, Loading, DeviceDecode]:
    """The training set as encoded JPEGs plus their crops, and the decoder that finishes them on the device."""
    images = data.train_images
    encoded = ImageListDataset(images.samples, EncodedTransform(images.transform.plan), images.failure_log,
                               images.max_pixels)
    decode = DeviceDecode(images.transform.ops, device, encoded.record_failure)
    return encoded, dataclasses.replace(loading, collate=collate_encoded), decode


def _criterion(cfg: Config, accelerator: Accelerator, data: RunData) -> nn.Module:
    return task_for(cfg).criterion(cfg.train, data.train_labels, len(data.classes)).to(accelerator.device)
