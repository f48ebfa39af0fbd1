"""The Source interface every data source implements, the registry that creates one from
`data.source`, and what sources hand out: `ListedImages` and the `ImageStore` that reads them.

The contract (see data/sources/__init__.py for the sources and the class-order rule): a Source is
made from a DataConfig and, optionally, a recorded class order. Everything that differs by source
is a method here; the rest of the code asks a Source and never checks which one it is. A new
source is one module with one `@register("kind")` class, plus its name in
configs.schema.DataConfig.source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from configs.errors import UsageError
from data.audit_training import TrainingData, prepare_training_data
from data.dataset import Loading
from data.folders import Splits
from data.sampling import FinishedBatches, TrainBatches
from data.sources.stores import FILES, ImageStore
from data.sources.training_images import TrainingImages


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


@dataclass
class ListedImages:
    """Images a source lists for predict and evaluate: every usable row of a CSV, a split of a
    dataset or of shards, the run's own validation or test split."""

    paths: list[Path]
    labels: list[str]  # class names as the source writes them ("" for a row without one; multi-label: ';'-joined)
    source: str  # what they are, for the report
    problems: list[dict] = field(default_factory=list)  # rows left out, as the CSV source reports them
    store: ImageStore = FILES  # how `paths` are read
    classes: list[str] | None = None  # a class list the evaluated checkpoint must have (shards: the index's)


@dataclass(frozen=True)
class Feed:
    """How the training batches are made, whatever the source stores them in."""

    batch_size: int
    loading: Loading
    seed: int
    draw: Callable[[int], list[int]] | None = None  # an epoch's indices (data.balance.BalancedDraw)
    finish: Callable | None = None  # on the device, per batch (data.transforms.BatchFinish)


SUBMISSION_COLUMNS = ("Id", "Class")  # a submission's id and label columns where the images name none


def file_ids(paths: list[Path]) -> list[str]:
    """Images' ids in a submission where nothing else names them: the file name without its extension."""
    return [p.stem for p in paths]


SOURCES: dict[str, type[Source]] = {}


def register(kind: str):
    """Class decorator: the Source of `data.source = kind`. A kind is registered once."""
    def add(cls: type[Source]) -> type[Source]:
        if kind in SOURCES:
            raise ValueError(f"source registry: {kind!r} is already registered ({SOURCES[kind].__name__}); "
                             f"{cls.__name__} needs another name")
        cls.kind = kind
        SOURCES[kind] = cls
        return cls
    return add


def source_class(kind: str) -> type[Source]:
    if kind not in SOURCES:
        raise UsageError(f"data.source = {kind!r} is not in the source registry (sources: {', '.join(SOURCES)})")
    return SOURCES[kind]


def open_source(d, classes: list[str] | None = None) -> Source:
    """The Source `d.source` names (d: a DataConfig). `classes`: a recorded class order (a resumed
    run's, a checkpoint's), which wins over the rule when the source holds exactly those names."""
    return source_class(d.source)(d, classes)


def open_listing(d, kind: str, path: str, root: str | None = None) -> Source:
    """The source of kind `kind` at `path` (predict/evaluate --csv FILE, --hf DIR, --shards DIR),
    read with the settings of the run's data config `d` (its column names, its task); `root`: the
    folder a CSV's paths are relative to (--data-root)."""
    cls = source_class(kind)
    return cls(cls.listing_config(d, path, root))


def source_reads(d) -> list[Path]:
    """What a run of data config `d` reads (Source.reads), before any source is opened."""
    return source_class(d.source).reads(d)


def describe_source(data: dict, layout: str = "") -> str:
    """The model card's sentence on what a run read, from its recorded config's [data] table."""
    return SOURCES.get(data.get("source", "folder"), SOURCES["folder"]).description(data, layout)


class Source:
    """One data source. Subclasses implement `_load`, `listed`, `_test_split` and `description`;
    the defaults fit sources whose images are files audited at every start."""

    kind: ClassVar[str] = ""
    decodes_on_device: ClassVar[bool] = True  # whether data.decode = auto may decode JPEGs on the GPU

    def __init__(self, d, classes: list[str] | None = None):
        self.d = d
        self.recorded = list(classes) if classes else None
        self._splits: Splits | None = None
        self._audited: Splits | None = None

    # ---- what it holds ----

    def _load(self) -> Splits:
        raise NotImplementedError

    def splits(self) -> Splits:
        """Class names (data.class_order), train and validation (path, label) lists, test paths."""
        if self._splits is None:
            self._splits = self._load()
        return self._splits

    @property
    def classes(self) -> list[str]:
        return self.splits().classes

    @property
    def root(self) -> Path:
        """data.root, as the user named it (a dataset's images may be cached elsewhere: `splits().root`)."""
        return Path(self.d.root).expanduser().resolve()

    @classmethod
    def reads(cls, d) -> list[Path]:
        """The paths a run of data config `d` reads, resolved, which its run.dir may not be or lie in
        (a folder) or sit beside (a file): trainer/files/run_lock.py. Opens nothing, never raises."""
        return [Path(d.root).expanduser().resolve()]

    @property
    def store(self) -> ImageStore:
        return FILES

    def audited(self) -> Splits:
        """The splits after the audit left bad files out, in one process outside training: what the
        run trained and validated on (evaluate, export, make_shards)."""
        if self._audited is None:
            self._audited = prepare_training_data(self.splits(), self.d, True, print).splits
        return self._audited

    def listed(self, split: str | None = None, labelled: bool = True) -> ListedImages:
        """The images of `split` (None: the source's default) for predict (`labelled=False`) and evaluate."""
        raise NotImplementedError

    def own_split(self, split: str) -> ListedImages:
        """evaluate --split: the run's validation split as training saw it (audited), or its test split."""
        if split == "val":
            return named_samples(self.audited(), "val", f"the validation split of {self.root}")
        return self._test_split()

    def _test_split(self) -> ListedImages:
        raise NotImplementedError

    def training_images(self) -> TrainingImages:
        """The run's training images, to find among others (the audit's cached hashes help)."""
        splits = self.splits()
        return TrainingImages.of_files([p for p, _ in splits.train], splits.root, self.d.audit_dir)

    # ---- training ----

    def check_training(self, cfg) -> None:
        """Refuse what this source cannot train with (cfg: the whole Config), before anything runs."""

    def open_for_training(self, accelerator) -> Splits:
        """The splits, every process; checks of the stored data that must pass before training."""
        return self.splits()

    def training_data(self, is_main: bool, say: Callable[[str], None]) -> TrainingData:
        """The splits training uses (after the audit), and the dataset statistics data.normalize wants."""
        return prepare_training_data(self.splits(), self.d, is_main, say)

    def train_batches(self, dataset, feed: Feed, accelerator) -> FinishedBatches:
        """This process's training batches: a resumable sampler over a map-style dataset."""
        return TrainBatches(dataset, feed.batch_size, feed.loading, feed.seed, accelerator, feed.draw, feed.finish)

    def check_shardable(self) -> None:
        """Refuse when launch/make_shards.py cannot write this source as shards."""

    # ---- submissions (predict --kaggle) ----

    def submission_columns(self) -> tuple[str, str]:
        """The (id, label) column names of a submission of the images this source lists."""
        return SUBMISSION_COLUMNS

    def submission_ids(self, paths: list[Path]) -> list[str]:
        """The id of each of `paths` (images this source listed) in a submission, as the source names it."""
        return file_ids(paths)

    # ---- describing ----

    @classmethod
    def description(cls, data: dict, layout: str) -> str:
        """What a run of this source read and where its validation images came from (model card)."""
        raise NotImplementedError

    @classmethod
    def listing_config(cls, d, path: str, root: str | None):
        """The run's data config `d` pointed at the source named on the command line."""
        return dataclasses.replace(d, source=cls.kind, root=str(Path(path).expanduser()))


def named_samples(splits: Splits, split: str, source: str) -> ListedImages:
    """A split's samples as ListedImages with class names, so evaluation maps them onto a
    checkpoint's class order by name."""
    return ListedImages([Path(p) for p, _ in getattr(splits, split)], splits.label_names(split), source)


def by_fraction(data: dict) -> str:
    """How a source without a validation split splits one off, for the model card."""
    return f"{data.get('val_fraction')} of each class (stratified, seed {data.get('seed')})"
