"""Audit an image folder: decode every file, find what would break or mislead training.

Per file (in parallel, cached by path + size + mtime): zero-byte, not an image (HTML, text),
truncated or corrupt, decompression bomb (over a pixel limit), too small. Across files (by
SHA-256 of the bytes): duplicates within a class, the same image under two classes
(conflicting labels) and the same image in train and validation (leakage). Valid oddities
(grayscale, palette, RGBA, CMYK, 16-bit, EXIF rotation, WebP, BMP, upper-case extensions) pass:
they go through the same `decode_rgb` that training uses. Hidden and system files (.DS_Store,
Thumbs.db) and non-image files are ignored and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import UnidentifiedImageError

from data.audit_cache import MeasurementCache, VerdictCache, audit_dir_for, verdict_key
from data.files import atomic_write_json, atomic_write_text
from data.folders import IMAGE_EXTENSIONS, Splits
from data.images import DEFAULT_MAX_PIXELS, DecompressionBomb, decode_rgb

SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})

# Problems that make a file unusable: training leaves it out, --quarantine moves it.
UNUSABLE = ("empty", "not_image", "corrupt", "decompression_bomb", "too_small")
ALL_PROBLEMS = (*UNUSABLE, "duplicate", "conflicting_labels", "leakage")
LEFT_OUT, KEPT = "left out", "kept"


# ----------------------------------------------------------------------------------------------
# One file (runs in worker processes: keep it free of torch)


def _sniff(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<svg")) or b"<html" in text:
        return "an HTML/XML page, not an image (a failed download?)"
    try:
        head.decode("utf-8")
        return "a text file, not an image"
    except UnicodeDecodeError:
        return "not a format PIL can read"


def measure_file(job: tuple[str, str, int, int, int]) -> tuple[str, dict]:
    """Decode one file fully and describe it: kind, size, content hash, per-channel moments."""
    path, relpath, size, mtime_ns, max_pixels = job
    record = {"size": size, "mtime_ns": mtime_ns, "kind": "ok", "detail": "", "width": 0, "height": 0,
              "sha256": "", "mean": None, "sq_mean": None, "max_pixels": max_pixels}
    if size == 0:
        return relpath, record | {"kind": "empty", "detail": "zero-byte file"}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return relpath, record | {"kind": "corrupt", "detail": f"cannot read: {e.strerror or e}"}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        array = decode_rgb(io.BytesIO(data), max_pixels)
    except DecompressionBomb as e:
        return relpath, record | {"kind": "decompression_bomb", "detail": str(e), "width": e.width,
                                  "height": e.height}
    except UnidentifiedImageError:
        return relpath, record | {"kind": "not_image", "detail": _sniff(data[:512])}
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged data
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        return relpath, record | {"kind": "corrupt", "detail": f"does not decode: {message}"}
    pixels = array.reshape(-1, 3).astype(np.float32) / 255.0
    record.update(height=int(array.shape[0]), width=int(array.shape[1]),
                  mean=pixels.mean(0, dtype=np.float64).round(6).tolist(),
                  sq_mean=np.square(pixels).mean(0, dtype=np.float64).round(6).tolist())
    return relpath, record


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Problem:
    path: str
    relpath: str
    split: str
    label: str
    problem: str
    detail: str
    action: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AuditResult:
    root: Path
    layout: str
    classes: list[str]
    folder: Path  # where the cache and reports live
    files_checked: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    ignored_system: int = 0
    ignored_other: int = 0
    ignored_examples: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    clean_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> count
    _measurements: dict[str, dict] = field(default_factory=dict, repr=False)
    _measure_later: Callable[[], dict[str, dict]] | None = field(default=None, repr=False)

    @property
    def measurements(self) -> dict[str, dict]:
        """relpath -> record. When the verdict cache answered the audit, read (or measured) only
        once something asks: dataset statistics for a file list stats.json does not hold."""
        if self._measure_later is not None:
            self._measurements, self._measure_later = self._measure_later(), None
        return self._measurements

    @property
    def left_out(self) -> set[str]:
        return {p.path for p in self.problems if p.action == LEFT_OUT}

    @property
    def leakage(self) -> list[Problem]:
        return [p for p in self.problems if p.problem == "leakage"]

    def counts_by_problem(self) -> Counter:
        return Counter(p.problem for p in self.problems)

    def imbalance_ratio(self, split: str = "train") -> float:
        counts = [c for c in self.clean_counts.get(split, {}).values()]
        return max(counts) / min(counts) if counts and min(counts) > 0 else float("inf")

    def imbalance_line(self) -> str:
        """The ratio of the largest to the smallest training class, or what is wrong when there is none."""
        counts = self.clean_counts.get("train", {})
        empty = [c for c, n in counts.items() if n == 0]
        if not counts:
            return "imbalance: no training classes"
        if len(empty) == len(counts):
            return (f"imbalance: not measured, some train class has no usable images - all {len(counts)} classes "
                    f"are empty after the problems below; fix or replace those files, or check data.root")
        if empty:
            named = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            return (f"imbalance: not measured, some train class has no usable images - {len(empty)} of {len(counts)}"
                    f" ({named}); training refuses an empty class: add images or remove its folder")
        ratio = self.imbalance_ratio()
        return (f"imbalance (largest / smallest train class): {ratio:.1f}x"
                + ("  - consider data.sampler=balanced or train.class_weights=balanced" if ratio >= 3 else ""))

    def clean(self, splits: Splits) -> Splits:
        """The splits without the files this audit leaves out (order and labels unchanged)."""
        gone = self.left_out
        # replace, not a new Splits: a subclass (multi-label splits) keeps its type and its fields
        return dataclasses.replace(splits, train=[s for s in splits.train if s[0] not in gone],
                                   val=[s for s in splits.val if s[0] not in gone],
                                   test=[p for p in splits.test if p not in gone])

    def to_dict(self) -> dict:
        return {"root": str(self.root), "layout": self.layout, "classes": self.classes,
                "files_checked": self.files_checked, "cache_hits": self.cache_hits,
                "seconds": round(self.seconds, 3), "ignored_system_files": self.ignored_system,
                "ignored_other_files": self.ignored_other, "problem_counts": dict(self.counts_by_problem()),
                "left_out": len(self.left_out), "class_counts": self.clean_counts,
                # null, not Infinity (which is not JSON), when a class is empty
                "imbalance_ratio": _finite_or_none(self.imbalance_ratio()), "problems": [p.to_dict() for p in self.problems]}

    def write_report(self, path: str | Path) -> Path:
        """JSON (the whole audit) or CSV (one row per problem file), chosen by the extension."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(Problem.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(p.to_dict() for p in self.problems)
            atomic_write_text(path, buffer.getvalue())
        else:
            atomic_write_json(path, self.to_dict(), indent=1)
        return path

    def summary_lines(self) -> list[str]:
        """The terminal summary: what was checked, per-class counts, one line per problem kind."""
        rate = self.files_checked / max(self.seconds, 1e-9)
        lines = [f"audit    {self.root} ({self.layout}): {self.files_checked} image files checked in "
                 f"{self.seconds:.1f}s ({rate:,.0f} files/s, {self.cache_hits} from cache)"]
        if self.ignored_system or self.ignored_other:
            example = f", e.g. {self.ignored_examples[0]}" if self.ignored_examples else ""
            lines.append(f"         ignored: {self.ignored_system} hidden/system files (.DS_Store, Thumbs.db), "
                         f"{self.ignored_other} non-image files{example}")
        splits = [s for s in ("train", "val", "test") if self.clean_counts.get(s)]
        width = max([len(c) for c in self.classes] + [5])
        lines.append(f"         {'class':<{width}}" + "".join(f"  {s:>7}" for s in splits))
        for name in self.classes:
            lines.append(f"         {name:<{width}}" + "".join(f"  {self.clean_counts[s].get(name, 0):>7}"
                                                            for s in splits))
        lines.append("         " + self.imbalance_line())
        counts = self.counts_by_problem()
        if not counts:
            lines.append("         no problems found")
        for kind in ALL_PROBLEMS:
            if counts[kind]:
                first = next(p for p in self.problems if p.problem == kind)
                lines.append(f"         {kind:<19} {counts[kind]:>6}  e.g. {first.relpath}: {first.detail}")
        return lines


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# The audit


def _relpath(path: str, root: Path) -> str:
    # String slicing, not Path.relative_to: this runs several times per file, and pathlib's
    # parsing was most of a warm-cache audit of 100,000 files.
    prefix = str(root)
    prefix = prefix if prefix.endswith(os.sep) else prefix + os.sep
    if path.startswith(prefix):
        return path[len(prefix):].replace(os.sep, "/")
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def cache_key(path: str, root: Path) -> str:
    """Where the measurement cache of `root`'s audit keeps `path`: its path relative to the root."""
    return _relpath(path, root)


def _relpaths(paths: list[str], root: Path) -> list[str]:
    """`_relpath` of many paths: the prefix test once per path and nothing else for the usual case."""
    prefix = str(root).rstrip(os.sep) + os.sep
    cut = len(prefix)
    return [p[cut:] if p.startswith(prefix) and os.sep == "/" else _relpath(p, root) for p in paths]


def count_ignored(root: Path) -> tuple[int, int, list[str]]:
    """Files under the root that are not audited: hidden/system files and non-image files."""
    system, other, examples = 0, 0, []
    for folder, dirs, files in os.walk(root):
        hidden_dirs = [d for d in dirs if d.startswith(".")]
        for d in hidden_dirs:
            dirs.remove(d)
            system += sum(len(f) for _, _, f in os.walk(os.path.join(folder, d)))
        for name in files:
            if name.startswith(".") or name.lower() in SYSTEM_FILES:
                system += 1
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                other += 1
                if len(examples) < 3:
                    examples.append(_relpath(os.path.join(folder, name), root))
    return system, other, examples


def _pool_context():
    # fork starts workers in milliseconds; after CUDA has been initialised only spawn is safe.
    torch = sys.modules.get("torch")
    if sys.platform == "linux" and not (torch is not None and torch.cuda.is_initialized()):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _default_signals() -> None:
    # A forked worker inherits the parent's Python signal handlers (a trainer's "checkpoint on
    # SIGTERM"); Pool.terminate ends workers with SIGTERM, which must end them.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def measure_all(jobs: list[tuple], workers: int, progress: bool) -> dict[str, dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="audit", unit="file", dynamic_ncols=True, leave=False,
               disable=not (progress and sys.stderr.isatty()))
    results = {}
    try:
        if workers <= 1 or len(jobs) < 32:  # a pool costs more than it saves on a handful of files
            for job in jobs:
                relpath, record = measure_file(job)
                results[relpath] = record
                bar.update()
        else:
            with _pool_context().Pool(workers, initializer=_default_signals) as pool:
                chunk = max(1, min(64, len(jobs) // (workers * 8)))
                for relpath, record in pool.imap_unordered(measure_file, jobs, chunksize=chunk):
                    results[relpath] = record
                    bar.update()
    finally:
        bar.close()
    return results


def audit_splits(splits: Splits, *, min_side: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                 audit_dir: str = "", use_cache: bool = True, write_cache: bool = True,
                 workers: int = 0, progress: bool = True, only: tuple[str, ...] = ("train", "val", "test")
                 ) -> AuditResult:
    """Check every file of the chosen splits; `workers=0` uses every core."""
    started = time.perf_counter()
    root = splits.root
    result = AuditResult(root, splits.layout, list(splits.classes), audit_dir_for(root, audit_dir))
    entries = _audited_entries(splits, only)
    files = [(path, rel, os.stat(path)) for (path, _, _), rel in zip(entries, _relpaths([e[0] for e in entries], root))]
    cache = MeasurementCache(result.folder, enabled=use_cache)

    def measure() -> dict[str, dict]:
        measurements, result.cache_hits = _measure(files, cache, max_pixels, workers or os.cpu_count() or 1,
                                                   progress)
        if write_cache and use_cache and result.cache_hits < len(files):
            # Keep entries of splits not audited this time (e.g. test) so they stay cached.
            top = str(root)
            cache.save({k: v for k, v in cache.entries.items() if os.path.exists(os.path.join(top, k))}
                       | measurements)
        return measurements

    verdicts = VerdictCache(result.folder, enabled=use_cache)
    key = verdict_key([(rel, split, name, st.st_size, st.st_mtime_ns)
                       for (_, split, name), (_, rel, st) in zip(entries, files)],
                      {"min_side": min_side, "max_pixels": max_pixels, "root": str(root)})
    verdict = verdicts.load(key)
    if verdict is not None:  # nothing changed since the last audit: its answer stands
        found = [Problem(**p) for p in verdict]
        result.cache_hits, result._measure_later = len(files), measure
    else:
        result._measurements = measure()
        found = _find_problems(entries, result._measurements, root, min_side, max_pixels)
        if write_cache:
            verdicts.save(key, [p.to_dict() for p in found])
    result.files_checked = len(entries)
    result.ignored_system, result.ignored_other, result.ignored_examples = count_ignored(root)
    result.problems = [Problem(**p) for p in splits.source_problems] + found
    gone = result.left_out
    for split in ("train", "val", "test"):
        counts = Counter(name for path, s, name in entries if s == split and path not in gone)
        if split != "test" and split in only:
            result.clean_counts[split] = {c: counts.get(c, 0) for c in splits.classes}
        elif split == "test" and counts:
            result.clean_counts["test"] = {"": sum(counts.values())}
    result.seconds = time.perf_counter() - started
    return result


def _audited_entries(splits: Splits, only: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(path, split, class name) of every file of the chosen splits; test files have no class."""
    labelled = {"train": splits.train, "val": splits.val}
    entries = []
    for split in ("train", "val"):
        if split in only:
            entries += [(path, split, splits.classes[label]) for path, label in labelled[split]]
    if "test" in only:
        entries += [(path, "test", "") for path in splits.test]
    return entries


def _measure(files: list[tuple[str, str, os.stat_result]], cache: MeasurementCache, max_pixels: int,
             workers: int, progress: bool) -> tuple[dict[str, dict], int]:
    """(relpath -> measurement, how many came from the cache): cached entries whose size and mtime
    still match, every other file decoded (in parallel)."""
    measurements, jobs = {}, []
    for path, rel, stat in files:
        cached = cache.get(rel, stat.st_size, stat.st_mtime_ns)
        # A bomb was never decoded: once the limit is raised above its size, decode it after all.
        if cached and not (cached["kind"] == "decompression_bomb"
                           and (not max_pixels or cached["width"] * cached["height"] <= max_pixels)):
            measurements[rel] = cached
        else:
            jobs.append((path, rel, stat.st_size, stat.st_mtime_ns, max_pixels))
    hits = len(measurements)
    measurements.update(measure_all(jobs, workers, progress))
    return measurements, hits


# Degenerate images, whatever the training size: a side under DEGENERATE_SIDE pixels (1x1 icons,
# tracking pixels) or one side over MAX_ASPECT times the other (2x500 slivers). Small images
# are not degenerate: upsampling (CIFAR's 32 px to 224) is standard fine-tuning practice.
DEGENERATE_SIDE = 8
MAX_ASPECT = 25


def _find_problems(entries, measurements, root: Path, min_side: int, max_pixels: int) -> list[Problem]:
    problems: list[Problem] = []
    by_hash: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for path, split, name in entries:
        rel = _relpath(path, root)
        m = measurements[rel]
        kind, detail = m["kind"], m["detail"]
        if kind in ("ok", "decompression_bomb") and max_pixels and m["width"] * m["height"] > max_pixels:
            kind, detail = "decompression_bomb", str(DecompressionBomb(m["width"], m["height"], max_pixels))
        elif kind == "ok" and min(m["width"], m["height"]) < min_side:
            why = "degenerate" if min_side <= DEGENERATE_SIDE else "data.min_image_side or --min-side"
            kind, detail = "too_small", f"{m['width']}x{m['height']}: a side is under {min_side} pixels ({why})"
        elif kind == "ok" and max(m["width"], m["height"]) > MAX_ASPECT * min(m["width"], m["height"]):
            kind, detail = "too_small", (f"{m['width']}x{m['height']}: a sliver, one side over {MAX_ASPECT}x "
                                         "the other (no crop of it shows anything)")
        if kind != "ok":
            problems.append(Problem(path, rel, split, name, kind, detail, LEFT_OUT))
        elif split != "test":
            by_hash[m["sha256"]].append((path, split, name))

    for members in by_hash.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda e: (e[1] != "train", _relpath(e[0], root)))  # train copies first
        labels = sorted({name for _, _, name in members})
        if len(labels) > 1:
            # The same picture under two classes: no way to know which label is right.
            for path, split, name in members:
                others = ", ".join(f"{_relpath(p, root)}" for p, _, n in members if n != name)
                problems.append(Problem(path, _relpath(path, root), split, name, "conflicting_labels",
                                        f"same image as {others} (labels {' vs '.join(labels)})", LEFT_OUT))
            continue
        keeper = members[0]
        keep_rel = _relpath(keeper[0], root)
        for path, split, name in members[1:]:
            if split == keeper[1]:
                problems.append(Problem(path, _relpath(path, root), split, name, "duplicate",
                                        f"same bytes as {keep_rel}", LEFT_OUT))
            else:  # the keeper is in train (sorted first), this copy in val
                problems.append(Problem(path, _relpath(path, root), split, name, "leakage",
                                        f"validation image identical to training image {keep_rel}", KEPT))
    order = {k: i for i, k in enumerate(ALL_PROBLEMS)}
    problems.sort(key=lambda p: (order[p.problem], p.relpath))
    return problems


def dataset_moments(result: AuditResult, paths: list[str]) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std (pixel values in 0..1) over `paths`, each image weighted equally
    (as a loader that resizes every image to one size would), from the audit's measurements."""
    means, squares = [], []
    for path in paths:
        m = result.measurements.get(_relpath(path, result.root))
        if m and m["mean"] is not None:
            means.append(m["mean"])
            squares.append(m["sq_mean"])
    if not means:
        raise ValueError("no decodable images to compute statistics from")
    mean = np.mean(np.asarray(means, dtype=np.float64), axis=0)
    sq = np.mean(np.asarray(squares, dtype=np.float64), axis=0)
    std = np.sqrt(np.maximum(sq - mean ** 2, 1e-12))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std], len(means)


def check_quarantine_folder(root: Path, dest: str | Path) -> Path:
    from configs.errors import UsageError

    dest, root = Path(dest).expanduser().resolve(), Path(root).resolve()
    if dest == root or root in dest.parents:
        # Inside the root, moved files would be found (and audited) again as data.
        raise UsageError(f"--quarantine {dest} is inside the data root {root}; choose a folder outside it")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--quarantine {dest} exists and is not a folder")
    return dest


def quarantine(result: AuditResult, dest: str | Path) -> list[tuple[Path, Path]]:
    """Move every problem file under `dest`, keeping its path relative to the data root. One copy
    of each duplicate group stays; nothing is deleted and nothing already in `dest` is overwritten."""
    import shutil

    dest = check_quarantine_folder(result.root, dest)
    moved, seen = [], set()
    for problem in result.problems:
        source = Path(problem.path)
        if source in seen or not source.exists():
            continue
        seen.add(source)
        target = dest / problem.relpath
        n = 1
        while target.exists():
            target = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        moved.append((source, target))
    return moved
