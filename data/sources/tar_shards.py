"""data.source = "shards": tar shards written by launch/make_shards.py (data/shards.py). Samples
are `SHARD.tar#KEY` references that only data.shards.ShardMembers reads; training streams the
tars (data.shards.ShardBatches), resumable at any batch. The samples were audited when the
shards were written, so a start checks each shard's size (every process) and sha256 (the main
process; unchanged shards are not read again) instead of auditing. There is no test split.

The class list is index.json's, put in data.class_order's order (or a recorded one): the labels
written in the tars are renumbered as they are read (data.shards.ShardIndex.in_order).
"""

from __future__ import annotations

from pathlib import Path

from configs.errors import UsageError
from data.audit_training import TrainingData
from data.class_order import class_order
from data.folders import Splits
from data.sampling import FinishedBatches
from data.shards import INDEX, SPLITS, ShardBatches, ShardIndex, ShardMembers, read_index, verify_shards
from data.sources.base import Feed, ListedImages, Source, register
from data.sources.training_images import TrainingImages


@register("shards")
class ShardsSource(Source):
    decodes_on_device = False  # the loader workers decode what they stream

    def __init__(self, d, classes: list[str] | None = None):
        super().__init__(d, classes)
        self._index: ShardIndex | None = None

    def index(self) -> ShardIndex:
        """index.json, checked against the files beside it (sizes; sha256 only where read)."""
        if self._index is None:
            written = read_index(self.d.root)
            self._index = written.in_order(class_order(written.classes, self.recorded))
        return self._index

    def _load(self) -> Splits:
        return self.index().to_splits()

    @property
    def root(self) -> Path:
        return self.index().root

    @property
    def store(self) -> ShardMembers:
        return ShardMembers(self.index())

    def audited(self) -> Splits:
        return self.splits()  # audited when the shards were written

    def listed(self, split: str | None = None, labelled: bool = True) -> ListedImages:
        """The samples of `split` (default: val) in the index's order, with their class names. That
        split's shards are checked against their sha256 first: a damaged shard is refused, not read
        (its samples could decode into wrong pixels, or fail one by one). Evaluating them needs a
        checkpoint with the index's classes, of one class per image."""
        split = split or "val"
        index = self.index()
        if labelled and self.d.task == "multilabel":
            raise UsageError("shards record one class per image (a multi-label row's first): evaluate a multi-label "
                             "checkpoint on a CSV of labelled images, --csv FILE")
        if split not in SPLITS:
            raise UsageError(f"{index.root} holds {' and '.join(SPLITS)} shards only (launch/make_shards.py writes "
                             f"no {split} split): evaluate {split} images by naming their folder, or with --csv FILE "
                             f"or --hf DIR")
        verify_shards(index, (split,), self.d.audit_dir)
        samples = index.samples(split)
        return ListedImages([Path(ref) for ref, _ in samples], [index.classes[label] for _, label in samples],
                            f"the {split} shards of {index.root}", store=ShardMembers(index),
                            classes=list(index.classes))

    def own_split(self, split: str) -> ListedImages:
        return self.listed(split)  # the val shards training validated on

    def submission_ids(self, paths: list[Path]) -> list[str]:
        """A sample's key: the part of its `SHARD.tar#KEY` reference after the '#'."""
        return [str(p).rpartition("#")[2] for p in paths]

    def training_images(self) -> TrainingImages:
        return TrainingImages([ref for ref, _ in self.index().samples("train")], self.store)

    # ---- training ----

    def check_training(self, cfg) -> None:
        d, t = cfg.data, cfg.train
        refused = [(d.sampler == "balanced", 'data.sampler = "balanced" (a draw with replacement needs random '
                                             'access)'),
                   (t.cache_features, "train.cache_features"),
                   (d.decode == "cuda", 'data.decode = "cuda" (shard samples are decoded by the loader workers)'),
                   (d.shuffle_buffer < 0, "a negative data.shuffle_buffer")]
        for bad, what in refused:
            if bad:
                raise UsageError(f"data.source = shards does not support {what}; change it or use the folder source")
        index = self.index()
        if d.normalize == "dataset" and not index.mean:
            raise UsageError(f"data.normalize = dataset: {index.root / INDEX} has no mean/std; write the shards "
                             f"again with launch/make_shards.py or set data.normalize=custom with data.mean/data.std")

    def open_for_training(self, accelerator) -> Splits:
        """Every process checks that each shard is there with its size (reading the index); the
        main process also checks every sha256, before anything is written."""
        index = self.index()
        hashed = 0
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                hashed = verify_shards(index, audit_dir=self.d.audit_dir)
        train, shards = index.splits["train"], len(index.shards("train")) + len(index.shards("val"))
        checked = "sha256 checked" + (f": {shards - hashed} of {shards} unchanged since their last check"
                                      if hashed < shards else "")
        accelerator.print(f"data     shards {index.root}: {train['samples']} training samples in "
                          f"{len(train['shards'])} shards, {index.splits['val']['samples']} validation ({checked})")
        return self.splits()

    def training_data(self, is_main: bool, say) -> TrainingData:
        """No audit (done when written); data.normalize = dataset takes index.json's mean/std."""
        index, dataset = self.index(), self.d.normalize == "dataset"
        return TrainingData(self.splits(), None, None, index.mean if dataset else (), index.std if dataset else ())

    def train_batches(self, dataset, feed: Feed, accelerator) -> FinishedBatches:
        """Streams the tars (feed.draw is refused above: shards are read in order, not drawn)."""
        return ShardBatches(self.index(), dataset, feed.batch_size, feed.loading, feed.seed, accelerator,
                            self.d.shuffle_buffer, feed.finish)

    def check_shardable(self) -> None:
        raise UsageError("the config already reads shards (data.source = shards): point it at the images "
                         "to shard (e.g. data.source=folder data.root=...)")

    @classmethod
    def description(cls, data: dict, layout: str) -> str:
        return (f"Tar shards written by launch/make_shards.py (`data.root` = `{data.get('root', '?')}`); "
                f"validation: its val shards")
