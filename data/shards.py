"""WebDataset-style tar shards: the writer, the index, and a training reader that resumes exactly.

A shards folder holds `train-000000.tar ...`, `val-000000.tar ...` and `index.json`. Each sample
is two consecutive tar members, `KEY.jpg` (or .png, ...: the source file's own bytes, never
re-encoded) and `KEY.cls` (the class index as text), so any WebDataset reader can read them too.
`index.json` holds the class names, the training split's mean/std, each shard's file name, size,
sha256 and, per sample, its label and where it starts in the tar (for validation, the sample
grid and a resumed run, which skip to a sample without reading what comes before it). A reader
may put the classes in another order (data.class_order: the rule, or a run's recorded order):
`ShardIndex.in_order` renumbers the labels, and the training stream renumbers each `KEY.cls`.

Training streams the tars (`ShardBatches`), yet its order is a pure function of (seed, epoch,
process count, loader streams), computed on sample numbers from the index before any byte is
read:
  1. the epoch's shards in an order drawn from (seed, epoch), their samples one after another,
     starting at a sample drawn from (seed, epoch) and wrapping around; padded to a multiple of
     the process count with the first samples (as DistributedSampler);
  2. process `rank` takes the rank-th contiguous range, so each process reads its own tars;
  3. inside that range, loader worker `w` takes a contiguous part with exactly the samples of the
     batches the DataLoader will take from it (batches w, w + workers, ...), so every process and
     worker run the same number of steps;
  4. each worker's part goes through a shuffle buffer of `data.shuffle_buffer` samples seeded from
     (seed, epoch, rank, worker), replayed on sample numbers: the buffer's output order is known
     in advance, and the worker keeps only encoded bytes, decoding a sample when it leaves the
     buffer under the augmentation seed of its position in the epoch (as data.sampling does).
A resumed run starts at any batch: each worker skips whole shards, seeks to the first sample it
still needs, and holds at most a buffer's worth of encoded samples; nothing skipped is decoded.
Not the `webdataset` package: its shard split, per-worker shuffle and RNG state live inside the
pipeline's iterators, so continuing at sample k means running (and decoding) the first k again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import math
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from configs.errors import UsageError
from data.audit_cache import DigestCache, audit_dir_for
from data.dataset import ImageListDataset, Loading
from data.files import atomic_folder, is_write_fault, sha256_file, write_failed
from data.folders import Splits
from data.sampling import _AUGMENT, _WORKERS, FinishedBatches, SeededCollate, derived_seeds, seeded_call

INDEX = "index.json"
FORMAT, VERSION = "imgtrain-shards", 1
SPLITS = ("train", "val")
_SHARDS, _BUFFER = 0x5EED_10, 0x5EED_11  # seed streams of the shard order and the shuffle buffers
_BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and data are padded to it


# ---- writing ----

def parse_size(text: str) -> int:
    """'256MB', '1.5GB', '64MiB', '100000' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    digits = text.strip().upper()
    unit = next((u for u in units if digits.endswith(u)), "")
    try:
        value = float(digits[: len(digits) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        raise UsageError(f"--shard-size {text!r}: give bytes with a unit, e.g. 256MB, 1GB or 64MiB") from None
    if value < 1:
        raise UsageError(f"--shard-size {text!r} must be positive")
    return int(value)


def _extension(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix or "img"


class _ShardWriter:
    """Writes one split's samples into tars of about `target` bytes, reproducibly (no times, owners)."""

    def __init__(self, folder: Path, split: str, target: int):
        self.folder, self.split, self.target = folder, split, target
        self.shards: list[dict] = []
        self.tar = None
        self.count = 0

    def add(self, data: bytes, ext: str, label: int) -> None:
        if self.tar is None or self.tar.fileobj.tell() >= self.target:
            self._open()
        key = f"{self.count:08d}"
        entry = self.shards[-1]
        entry["offsets"].append(self.tar.fileobj.tell())
        entry["sizes"].append(len(data))
        entry["labels"].append(label)
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode())
        self.count += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self.tar.addfile(info, io.BytesIO(data))

    def _open(self) -> None:
        self._close()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.tar = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"file": name, "first": self.count, "labels": [], "offsets": [], "sizes": []})

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        entry = self.shards[-1]
        path = self.folder / entry["file"]
        entry.update(samples=len(entry["labels"]), bytes=path.stat().st_size, sha256=sha256_file(path))
        self.tar = None

    def finish(self) -> dict:
        self._close()
        return {"samples": self.count, "bytes": sum(s["bytes"] for s in self.shards), "shards": self.shards}


def write_shards(splits: Splits, out: str | Path, target_bytes: int, stats: tuple, source: dict,
                 seed: int = 0, say=print) -> dict:
    """Write `splits.train` and `.val` as shards plus index.json into the new folder `out`, atomically.

    Training samples are written in an order shuffled by `seed`: a reader's shuffle buffer only
    mixes neighbours, and a split sorted by class would feed it one class at a time. Validation
    keeps the source's order. `stats`: the training split's (mean, std) or empty; `source`: what
    the shards were made from (a digest over every sample's relative path, size and sha256 is
    added here)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty: choose a new folder (shards are never "
                         f"merged into or replaced)")
    for split in SPLITS:
        if not getattr(splits, split):
            raise UsageError(f"the {split} split of {splits.root} is empty after the audit: nothing to write")
    try:
        return _write_folder(splits, out, target_bytes, stats, source, seed, say)
    except OSError as e:  # reads are UsageErrors of their own (_source_bytes): this is a write
        if not is_write_fault(e):
            raise
        raise write_failed(out, e, "nothing was left behind; {remedy} (or choose another --out) and run "
                                   "again") from None


def _source_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror or e}); fix its permissions or leave it out") from None


def _write_folder(splits: Splits, out: Path, target_bytes: int, stats: tuple, source: dict, seed: int,
                  say) -> dict:
    started, digest = time.perf_counter(), hashlib.sha256()
    with atomic_folder(out) as tmp:
        index = {"format": FORMAT, "version": VERSION, "classes": list(splits.classes), "shuffle_seed": seed,
                 "mean": list(stats[0]) if stats else [], "std": list(stats[1]) if stats else [],
                 "target_shard_bytes": target_bytes, "splits": {}}
        for split in SPLITS:
            writer = _ShardWriter(tmp, split, target_bytes)
            samples = getattr(splits, split)
            if split == "train":
                samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
            for path, label in samples:
                data = _source_bytes(path)
                rel = os.path.relpath(path, splits.root) if Path(path).is_absolute() else str(path)
                digest.update(f"{split}\t{rel}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n".encode())
                writer.add(data, _extension(path), label)
            index["splits"][split] = writer.finish()
            done = index["splits"][split]
            say(f"shards   {split}: {done['samples']} samples in {len(done['shards'])} shards, "
                f"{done['bytes'] / 1e6:.1f} MB")
        index["source"] = {**source, "samples_sha256": digest.hexdigest()}
        (tmp / INDEX).write_text(json.dumps(index))
    say(f"shards   wrote {out} in {time.perf_counter() - started:.1f}s")
    return index


# ---- reading the index ----

@dataclass
class ShardIndex:
    """index.json of a shards folder, checked against the files beside it. `classes` may be in
    another order than the one written (`in_order`): the labels in `splits` are then indices into
    the new order, and `label_map` turns a tar's `KEY.cls` (an index into the written order) into one."""

    root: Path
    classes: list[str]
    mean: tuple
    std: tuple
    splits: dict  # split -> {"samples", "bytes", "shards": [{"file", "first", "samples", "bytes", "sha256", ...}]}
    label_map: tuple[int, ...] | None = None  # written label -> label; None: the order written

    def shards(self, split: str) -> list[dict]:
        return self.splits[split]["shards"]

    def in_order(self, classes: list[str]) -> ShardIndex:
        """This index with `classes` (the same names, in another order: data.class_order) as its class
        list; the samples' bytes and places are the same."""
        if classes == self.classes:
            return self
        position = {name: i for i, name in enumerate(classes)}
        new = [position[name] for name in self.classes]
        renumbered = {split: {**part, "shards": [{**s, "labels": [new[label] for label in s["labels"]]}
                                                  for s in part["shards"]]}
                      for split, part in self.splits.items()}
        written = self.label_map or range(len(self.classes))
        return ShardIndex(self.root, list(classes), self.mean, self.std, renumbered,
                          tuple(new[label] for label in written))

    def samples(self, split: str) -> list[tuple[str, int]]:
        """(reference, label) per sample, references as ShardMembers reads them: `SHARD.tar#KEY`."""
        return [(f"{self.root / s['file']}#{s['first'] + j:08d}", label)
                for s in self.shards(split) for j, label in enumerate(s["labels"])]

    def to_splits(self) -> Splits:
        return Splits(self.root, list(self.classes), self.samples("train"), self.samples("val"), layout="shards")


def read_index(root: str | Path) -> ShardIndex:
    """The index of the shards folder `root`; a missing, unreadable or foreign index.json, a
    missing shard, one of another size or an empty split is refused in one line naming the file."""
    root = Path(root).expanduser().resolve()
    path = root / INDEX
    if not path.is_file():
        raise UsageError(f"{path} not found: data.source = shards reads a folder written by "
                         f"`python launch/make_shards.py --config C.toml --out {root}`")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}; this code reads version {VERSION}")
        index = ShardIndex(root, list(raw["classes"]), tuple(raw["mean"]), tuple(raw["std"]),
                           {split: raw["splits"][split] for split in SPLITS})
        for split in SPLITS:
            _check_split(index.splits[split], split)
            for shard in index.shards(split):
                _check_entry(shard, len(index.classes))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path} is not a readable shards index ({type(e).__name__}: {e}); write the folder "
                         f"again with launch/make_shards.py") from None
    for split in SPLITS:
        if index.splits[split]["samples"] < 1:
            raise UsageError(f"{path}: the {split} split has no samples; write shards from a source with both "
                             f"train and val samples")
        for shard in index.shards(split):
            file = root / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size is None:
                raise UsageError(f"{file} is missing (listed in {path})")
            if size != shard["bytes"]:
                raise UsageError(f"{file} is damaged: {size} bytes, index.json says {shard['bytes']} (truncated or "
                                 f"replaced); copy it again or rewrite the shards")
    return index


def _check_split(part: dict, split: str) -> None:
    if not isinstance(part, dict) or not _is_int(part.get("samples")) or not isinstance(part.get("shards"), list):
        raise ValueError(f"splits.{split} is not an object with a sample count and a list of shards")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(shard: dict, classes: int) -> None:
    """One shard's entry: a file in the shards folder itself (a name like `../x.tar` or an absolute
    path is refused before anything opens or hashes it), a sample count, size and sha256, and per
    sample an offset, a size and a whole-number label that indexes the class list (readers index
    `classes` with it unchecked)."""
    if not isinstance(shard, dict):
        raise ValueError(f"a shard entry is a {type(shard).__name__}, not an object")
    file = shard["file"]
    if not (isinstance(file, str) and file.endswith(".tar") and Path(file).name == file
            and not file.startswith(".") and "\\" not in file):
        raise ValueError(f"shard file {str(file)[:120]!r} is not the name of a .tar in the shards folder")
    _ = shard["sha256"]
    if not all(_is_int(shard[key]) for key in ("first", "bytes", "samples")):
        raise ValueError(f"{file}: first, bytes and samples must be whole numbers")
    n = shard["samples"]
    if not len(shard["labels"]) == len(shard["offsets"]) == len(shard["sizes"]) == n:
        raise ValueError(f"{shard['file']} lists {n} samples but {len(shard['labels'])} labels, "
                         f"{len(shard['offsets'])} offsets and {len(shard['sizes'])} sizes")
    labels = shard["labels"]
    for name in ("labels", "offsets", "sizes"):
        if not set(map(type, shard[name])) <= {int}:  # one C loop; a label 1.0 would pass the bounds below
            stray = next(v for v in shard[name] if not _is_int(v))
            raise ValueError(f"{file}: {name} holds {stray!r}, not a whole number")
    if labels and not (0 <= min(labels) and max(labels) < classes):  # min/max: one C loop per shard
        stray = next(j for j, label in enumerate(labels) if not 0 <= label < classes)
        raise ValueError(f"{shard['file']}: the label of sample {shard['first'] + stray} is "
                         f"{labels[stray]!r}, not one of the {classes} classes' indices")


def verify_shards(index: ShardIndex, splits: tuple[str, ...] = SPLITS, audit_dir: str = "") -> int:
    """The sha256 of every shard of `splits` against the index (all cores: hashlib releases the
    GIL); how many were hashed. Evaluating one split hashes only its shards: the training split
    may be most of the data. A shard verified before and unchanged since (same size, mtime and
    inode, recorded in the root's audit folder) is not read again."""
    digests = DigestCache(audit_dir_for(index.root, audit_dir))
    todo = [(s, index.root / s["file"]) for split in splits for s in index.shards(split)]
    todo = [(s, file) for s, file in todo if digests.known(file) != s["sha256"]]

    def check(item):
        stat = item[1].stat()  # before reading: a shard rewritten meanwhile is hashed again next time
        return sha256_file(item[1]), stat, _foreign_member(item[1], item[0])

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        results = list(pool.map(check, todo))
    for (shard, file), (digest, stat, foreign) in zip(todo, results):
        if digest != shard["sha256"] or foreign:
            digests.save()  # the shards that did check out stay verified
            if foreign:
                raise UsageError(f"{file} is not a shard as make_shards writes it: {foreign}; rewrite the shards "
                                 f"with launch/make_shards.py")
            raise UsageError(f"{file} is damaged: its sha256 differs from index.json's; "
                             f"copy it again or rewrite the shards")
        digests.record(file, digest, stat)
    digests.save()
    return len(todo)


def _foreign_member(path: Path, shard: dict) -> str:
    """What in the tar `path` is not what index.json says of it ("" when nothing): every member a
    regular file named `KEY.ext` (no folder, no `../x`, no `/abs`: a WebDataset reader or `tar x`
    would write those outside the folder), two per sample, the image where the index puts it."""
    try:
        with tarfile.open(path, "r:") as tar:  # headers only: the data is seeked over
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as e:
        return f"not a readable tar ({e})"
    for member in members:
        key, _, ext = member.name.partition(".")
        if not (member.isreg() and key.isdigit() and ext.isalnum()):
            return f"member {member.name[:120]!r} is not a sample file KEY.ext"
    if len(members) != 2 * shard["samples"]:
        return f"{len(members)} members for the {shard['samples']} samples index.json lists"
    for j, member in enumerate(members[::2]):
        if member.offset != shard["offsets"][j] or member.size != shard["sizes"][j]:
            return f"sample {shard['first'] + j} is not where index.json puts it"
    return ""


class ShardMembers:
    """Where the shards source's samples are stored (a data.sources.ImageStore): `SHARD.tar#KEY`
    references, read from the tar at the offset the index gives (validation, the sample grid,
    predict and evaluate), then decoded like files. With a transform it is an ImageTransform over
    the references; without one it only reads (`size`, `read`, `sha256`: bytes compared with
    training images)."""

    def __init__(self, index: ShardIndex, transform=None):
        self.index, self.transform = index, transform
        self.where = {s["file"]: s for split in SPLITS for s in index.shards(split)}

    def with_transform(self, transform) -> ShardMembers:
        return ShardMembers(self.index, transform)

    def _locate(self, reference: str) -> tuple[str, dict, int]:
        path, key = reference.rsplit("#", 1)
        shard = self.where[Path(path).name]
        return path, shard, int(key) - shard["first"]

    def size(self, reference: str) -> int:
        _, shard, j = self._locate(reference)
        return shard["sizes"][j]

    def read(self, reference: str) -> bytes:
        path, shard, j = self._locate(reference)
        return _read_sample(path, shard["offsets"][j], shard["sizes"][j])

    def sha256(self, reference: str) -> str:
        return hashlib.sha256(self.read(reference)).hexdigest()

    def load(self, reference: str, max_pixels: int) -> torch.Tensor:
        return self.transform.load(io.BytesIO(self.read(reference)), max_pixels)

    def __repr__(self) -> str:
        return f"ShardMembers({self.transform!r})"


def _read_sample(path: str, offset: int, size: int) -> bytes:
    # The image member's data follows its one 512-byte ustar header (names are short, so no long-name
    # header comes first): one positioned read, safe in forked workers (no shared file offset).
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset + _BLOCK)
    finally:
        os.close(fd)


# ---- the order of an epoch ----

@dataclass(frozen=True)
class Segment:
    shard: int  # index into the split's shards
    start: int  # sample numbers inside the shard, [start, stop)
    stop: int


def _take(segments: list[Segment], begin: int, length: int) -> list[Segment]:
    """The samples at positions [begin, begin + length) of the stream `segments` describes."""
    out, position = [], 0
    for seg in segments:
        n = seg.stop - seg.start
        lo, hi = max(begin - position, 0), min(begin + length - position, n)
        if lo < hi:
            out.append(Segment(seg.shard, seg.start + lo, seg.start + hi))
        position += n
    return out


def buffer_order(count: int, size: int, seed: int) -> np.ndarray:
    """The output order of a shuffle buffer of `size` fed slots 0..count-1: while full, a random
    slot leaves and the next input takes its place; at the end the rest leave in random order.
    Output t is always among the first t + size inputs, so a reader holds at most `size` samples."""
    if size <= 1 or count <= 1:
        return np.arange(count)
    rng = np.random.Generator(np.random.PCG64(seed))
    buffer = np.arange(min(size, count))
    picks = rng.integers(0, len(buffer), max(count - len(buffer), 0))
    out = np.empty(count, dtype=np.int64)
    for t, (j, new) in enumerate(zip(picks.tolist(), range(len(buffer), count))):
        out[t] = buffer[j]
        buffer[j] = new
    out[count - len(buffer):] = rng.permutation(buffer)
    return out


class ShardOrder:
    """The sampler of shard training: a data.sampling.ResumableOrder (what the run state and the
    loop read) plus each worker's plan for the epoch."""

    def __init__(self, counts: list[int], batch_size: int, seed: int, rank: int, world_size: int,
                 streams: int, buffer: int):
        self.counts, self.batch_size, self.seed = list(counts), batch_size, seed
        self.rank, self.world_size, self.streams, self.buffer = rank, world_size, max(1, streams), buffer
        self.num_samples = sum(self.counts)
        if self.num_samples < 1:
            raise ValueError("the training split is empty")
        self.epoch, self.samples_done = 1, 0

    @property
    def order_key(self) -> dict:
        """What the order depends on besides (seed, epoch, process count): a checkpoint records it."""
        return {"data.num_workers": self.streams}

    @property
    def padded_size(self) -> int:
        return math.ceil(self.num_samples / self.world_size) * self.world_size

    @property
    def per_rank(self) -> int:
        return self.padded_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def first_batch(self) -> int:
        """The batch this process starts the epoch at (RunState.batch_in_epoch)."""
        return min(self.samples_done // self.samples_per_step, self.steps_per_epoch)

    def start_epoch(self, epoch: int, samples_done: int = 0) -> None:
        self.epoch, self.samples_done = epoch, min(max(samples_done, 0), self.padded_size)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.first_batch

    def _epoch_stream(self) -> list[Segment]:
        """The shards in a seeded order, their samples one after another, started at a seeded
        sample (so that with few shards, processes and workers still get other samples every
        epoch), then padded with the stream's first samples."""
        g = torch.Generator().manual_seed(int(derived_seeds(self.seed, self.epoch, _SHARDS)[0]))
        shards = [Segment(s, 0, self.counts[s]) for s in torch.randperm(len(self.counts), generator=g).tolist()]
        start = int(torch.randint(self.num_samples, (), generator=g))
        segments = _take(shards, start, self.num_samples - start) + _take(shards, 0, start)
        return segments + _take(segments, 0, self.padded_size - self.num_samples)

    def _batch_size(self, batch: int) -> int:
        return min(self.batch_size, self.per_rank - batch * self.batch_size)

    def stream_plan(self, stream: int) -> tuple[list[Segment], np.ndarray]:
        """Worker stream `stream`'s samples in reading order, and its output order over them."""
        sizes = [sum(self._batch_size(b) for b in range(v, self.steps_per_epoch, self.streams))
                 for v in range(self.streams)]
        rank_range = _take(self._epoch_stream(), self.rank * self.per_rank, self.per_rank)
        segments = _take(rank_range, sum(sizes[:stream]), sizes[stream])
        seed = int(derived_seeds(self.seed, self.epoch, self.rank, stream, _BUFFER)[0])
        return segments, buffer_order(sizes[stream], self.buffer, seed)

    def position(self, stream: int, t: int) -> int:
        """Output t of `stream` -> its position in the epoch (rank-interleaved, as ResumableSampler):
        the key of its augmentation seed."""
        local_batch, slot = divmod(t, self.batch_size)
        batch = local_batch * self.streams + stream
        return (batch * self.batch_size + slot) * self.world_size + self.rank


# ---- the training stream ----

def read_segment(root: Path, shard: dict, segment: Segment, wanted: np.ndarray):
    """(slot, (ext, bytes, label)) for the wanted samples of one segment, streaming the tar from
    the first wanted sample (one seek) to the last; `wanted` marks the segment's samples by slot."""
    hits = np.flatnonzero(wanted)
    if not len(hits):
        return
    first, last = segment.start + int(hits[0]), segment.start + int(hits[-1])
    path = root / shard["file"]
    with open(path, "rb") as f:
        f.seek(shard["offsets"][first])
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                sample, pending = first, {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if int(key) != shard["first"] + sample:
                        raise tarfile.ReadError(f"member {member.name} where sample {shard['first'] + sample} "
                                                f"was expected")
                    if wanted[sample - segment.start]:
                        pending[ext] = tar.extractfile(member).read()
                    else:
                        pending[ext] = b""
                    if len(pending) == 2:
                        image_ext = next(e for e in pending if e != "cls")
                        if wanted[sample - segment.start]:
                            yield sample - segment.start, (f"{path}#{key}", pending[image_ext], int(pending["cls"]))
                        pending = {}
                        if sample == last:
                            return
                        sample += 1
        except (tarfile.TarError, ValueError, OSError) as e:
            raise RuntimeError(f"{path} cannot be read at sample {sample}: {e}") from None
    raise RuntimeError(f"{path} ended before sample {last}")


class ShardStream(IterableDataset):
    """This process's training batches for the epoch `order` is at, from its first batch; each
    DataLoader worker makes the batches the loader will take from it (see the module docstring).

    `images`: the training split as an ImageListDataset over ShardMembers, for its decoding
    (transform, pixel limit) and its failure log."""

    def __init__(self, index: ShardIndex, order: ShardOrder, images: ImageListDataset, collate):
        self.root, self.shards, self.order = index.root, index.shards("train"), order
        self.label_map = index.label_map  # a tar's KEY.cls is in the order the shards were written
        self.images, self.transform, self.collate = images, images.transform.transform, SeededCollate(collate)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order, k = self.order, self.order.first_batch
        assert workers == order.streams, "the order was planned for another number of loader workers"
        # The loader takes batch j of the epoch's rest from worker j % workers: this worker makes
        # batches k + worker, k + worker + workers, ..., which all come from one stream.
        stream, local = (k + worker) % workers, (k + worker) // workers
        if k + worker >= order.steps_per_epoch:
            return
        segments, outputs = order.stream_plan(stream)
        t0 = local * order.batch_size
        seeds = derived_seeds(order.seed, order.epoch, _AUGMENT, count=order.padded_size)  # as ResumableSampler
        batch, last_good = [], None
        for t, (name, data, label) in zip(range(t0, len(outputs)), self._replay(segments, outputs[t0:])):
            seed = int(seeds[order.position(stream, t)])
            if self.label_map is not None:
                label = self.label_map[label]
            try:
                image = seeded_call(seed, self._decode, data)
                last_good = (data, label)
            except Exception as e:  # a decoder that fails on audited bytes: skipped, listed, replaced
                self.images.record_failure(name, e)
                if last_good is None:
                    raise
                image, label = seeded_call(seed, self._decode, last_good[0]), last_good[1]
            batch.append((seed, (image, label)))
            if len(batch) == order.batch_size or t == len(outputs) - 1:
                yield self.collate(batch)
                batch = []

    def _decode(self, data: bytes) -> torch.Tensor:
        return self.transform.load(io.BytesIO(data), self.images.max_pixels)

    def _replay(self, segments: list[Segment], outputs: np.ndarray):
        """The samples of `outputs` (slots of the stream, in output order), reading the stream's
        segments in order and holding only what the buffer would hold."""
        total = sum(s.stop - s.start for s in segments)
        wanted = np.zeros(total, dtype=bool)
        wanted[outputs] = True
        held, t, base = {}, 0, 0
        for segment in segments:
            n = segment.stop - segment.start
            for slot, sample in read_segment(self.root, self.shards[segment.shard], segment, wanted[base:base + n]):
                held[base + slot] = sample
                while t < len(outputs) and int(outputs[t]) in held:
                    yield held.pop(int(outputs[t]))
                    t += 1
            base += n
        if t != len(outputs):
            raise RuntimeError(f"shard stream ended after {t} of {len(outputs)} samples")


def _as_is(batch):
    return batch


class ShardBatches(FinishedBatches):
    """What data.sampling.TrainBatches is for the folder source, for shards: this process's
    training batches, on its device, resumable at any batch (`start_epoch(epoch, samples_done)`)."""

    def __init__(self, index: ShardIndex, images: ImageListDataset, batch_size: int, loading: Loading, seed: int,
                 accelerator, buffer: int, finish=None):
        from accelerate.data_loader import prepare_data_loader

        rank, world = accelerator.process_index, accelerator.num_processes
        counts = [s["samples"] for s in index.shards("train")]
        self.sampler = ShardOrder(counts, batch_size, seed, rank, world, loading.num_workers, buffer)
        stream = ShardStream(index, self.sampler, images, loading.collate)
        kwargs = loading.kwargs()
        # Workers are forked for every epoch, so they see the epoch and resume point set on the
        # stream; the fork costs little next to an epoch (the dataset is only the index).
        kwargs["persistent_workers"] = False
        generator = torch.Generator().manual_seed(int(derived_seeds(seed, rank, _WORKERS)[0]))
        loader = DataLoader(stream, batch_size=None, collate_fn=_as_is, generator=generator, **kwargs)
        # dispatch_batches=False: each process reads its own shards (Accelerate would broadcast rank 0's).
        self.loader = prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                                          put_on_device=True, rng_types=[], dispatch_batches=False,
                                          non_blocking=loading.pin_memory)
        self.finish = finish

    def __len__(self) -> int:
        return len(self.sampler)
