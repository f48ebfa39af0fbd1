"""What training does with the audit: leave out bad files, act on leakage, dataset statistics.

Called once per process before anything is written, inside `accelerator.main_process_first()`:
the main process audits (in parallel, writing the cache and report), then the others read the
same answer from the cache without writing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.audit import DEGENERATE_SIDE, MAX_ASPECT, AuditResult, audit_splits
from data.audit_cache import warn_unwritable
from data.files import is_write_fault
from data.folders import Splits
from data.stats import training_stats
from configs.errors import UsageError


@dataclass
class TrainingData:
    splits: Splits
    audit: AuditResult | None
    report_path: Path | None
    mean: tuple = ()  # the training split's statistics when data.normalize = "dataset"
    std: tuple = ()


def min_side_for(data_cfg) -> int:
    """data.min_image_side, or (0) only degenerate images: small ones are upsampled, not dropped."""
    return data_cfg.min_image_side or DEGENERATE_SIDE


def source_stats(data_cfg, splits: Splits) -> tuple[tuple, tuple]:
    """The training split's mean/std for index.json (launch/make_shards.py), measured as
    data.normalize = "dataset" would: from the audit's cache, the files being the audited ones."""
    data = dataclasses.replace(data_cfg, audit="off", normalize="dataset")
    prepared = prepare_training_data(splits, data, True, print)
    return prepared.mean, prepared.std


def prepare_training_data(splits: Splits, data_cfg, is_main: bool, say: Callable[[str], None]) -> TrainingData:
    d = data_cfg
    _say_source_problems(splits, say, d.audit == "on")
    if d.audit == "off" and d.normalize != "dataset":
        return TrainingData(splits, None, None)
    # With the audit off, dataset statistics still need the training files measured (no exclusions).
    only = ("train",) if d.audit == "off" else ("train", "val")
    result = audit_splits(splits, min_side=min_side_for(d), max_pixels=d.max_image_pixels, audit_dir=d.audit_dir,
                          write_cache=is_main, progress=is_main, only=only)
    report_path = None
    if d.audit == "on":
        report_path = result.folder / "report.json"
        if is_main:
            _write_report(result, report_path)
        splits = _apply(result, splits, d, report_path, say)
    mean = std = ()
    if d.normalize == "dataset":
        mean, std = training_stats(result, [path for path, _ in splits.train], write=is_main)
        say(f"data     normalize with the training split's mean {_fmt(mean)} std {_fmt(std)} "
            f"(cached in {result.folder / 'stats.json'})")
    return TrainingData(splits, result, report_path, tuple(mean), tuple(std))


def _write_report(result: AuditResult, path: Path) -> None:
    """The audit's report; on a full disk or an unwritable folder one warning, and training goes on."""
    try:
        result.write_report(path)
    except OSError as e:
        if not is_write_fault(e):
            raise
        warn_unwritable(path.parent, e)


def _say_source_problems(splits: Splits, say: Callable[[str], None], reported: bool) -> None:
    """The rows a source left out (a CSV row naming a missing file...), with the first one's line."""
    problems = splits.source_problems
    if problems:
        kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(p["problem"] for p in problems).items())
        say(f"data     left out {len(problems)} rows ({kinds}), e.g. {problems[0]['detail']}"
            + ("; the audit report lists them all" if reported else ""))


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _apply(result: AuditResult, splits: Splits, d, report_path: Path, say) -> Splits:
    counts = result.counts_by_problem()
    left_out = result.left_out
    checked = f"{result.files_checked} files checked in {result.seconds:.1f}s ({result.cache_hits} cached)"
    if left_out:
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind != "leakage")
        say(f"audit    left out {len(left_out)} of {result.files_checked} files ({kinds}); {checked}; "
            f"report: {report_path}")
    else:
        say(f"audit    no bad files; {checked}; report: {report_path}")
    leaks = result.leakage
    if leaks:
        message = (f"{len(leaks)} validation images are identical to training images (leakage inflates "
                   f"validation scores), e.g. {leaks[0].relpath}: {leaks[0].detail}; see {report_path}")
        if d.leakage == "error":
            raise UsageError(f"{message}; remove them (python launch/audit.py {result.root} --quarantine DIR) "
                             f"or set data.leakage=warn")
        say(f"warning: {message}; data.leakage=error makes this fatal")
    clean = result.clean(splits)
    # The splits' own counts: a multi-label image counts for each of its classes.
    empty = [c for c, n in clean.class_counts("train").items() if n == 0]
    if empty:
        problems = [p for p in result.problems if p.label == empty[0] and p.split == "train"]
        kinds = Counter(p.problem for p in problems)
        hint = "; fix or remove the class folder"
        if kinds.get("too_small"):
            slivers = sum(p.problem == "too_small" and "sliver" in p.detail for p in problems)
            small = kinds["too_small"] - slivers
            why = []
            if small:
                why.append(f"{small} have a side under {min_side_for(d)} pixels" + (
                    f" (data.min_image_side; 0 keeps every image with a side of {DEGENERATE_SIDE} or more)"
                    if d.min_image_side else " (degenerate)"))
            if slivers:
                why.append(f"{slivers} are slivers, one side over {MAX_ASPECT}x the other (crop them to a less "
                           f"extreme shape)")
            hint = "; " + " and ".join(why)
        raise UsageError(f"class '{empty[0]}' has no usable training images after the audit left out "
                         f"{', '.join(f'{n} {k}' for k, n in kinds.items())} (see {report_path}){hint}")
    return clean
