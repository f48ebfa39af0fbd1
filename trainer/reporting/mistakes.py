"""What the model gets wrong, from one evaluation's per-image probabilities. One owner for both
places that show it: the end of a training run (the best epoch's validation predictions, which
are out-of-sample: the model never trained on those images) and `evaluate.py`.

    top_losses.png / .csv  the wrong predictions the model was surest of, worst first (fastai's
                           plot_top_losses): actual / predicted / probability / loss
    most_confused.csv      (actual, predicted) class pairs by how often (fastai's most_confused)
    label_issues.csv       images whose given label the predictions contradict, most likely first:
                           cleanlab's confident learning (`cleanlab.filter.find_label_issues`),
                           which needs out-of-sample probabilities and a few images per class

Multi-label: the top losses are (image, class) decisions that are wrong at the class's threshold
(a false positive or a missed label), most_confused.csv counts each class's false positives and
misses, and label issues come from `cleanlab.multilabel_classification.filter.find_label_issues`.

Only numpy and the csv module here (cleanlab and the plots are imported when used): no torch, so
the tables are computed the same wherever probabilities come from.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data.files import atomic_output

TOP_LOSSES = 16  # images in the top-losses grid (evaluate.py --top-losses)
# Below this many images of a class, cleanlab's per-class thresholds are guesses: its label errors
# may be missed (cleanlab warns per class; the note says it once, naming them).
FEW_PER_CLASS = 5
NOT_JUDGED = "label issues: not judged"  # how every note of labels left unjudged begins
MISTAKE_FILES = ("top_losses.png", "top_losses.csv", "most_confused.csv", "label_issues.csv")
SINGLE_COLUMNS = {"top_losses.csv": ["rank", "path", "actual", "predicted", "probability", "actual_probability",
                                     "loss"],
                  "most_confused.csv": ["actual", "predicted", "count", "share"],
                  "label_issues.csv": ["path", "given_label", "suggested_label", "given_label_probability",
                                       "suggested_label_probability", "rank"]}
MULTILABEL_COLUMNS = {"top_losses.csv": ["rank", "path", "class", "error", "score", "threshold", "loss"],
                      "most_confused.csv": ["class", "missed", "missed_share", "false_positives",
                                            "false_positive_share", "positives", "negatives"],
                      "label_issues.csv": ["path", "given_labels", "suggested_labels", "label_quality", "rank"]}


@dataclass
class Evaluated:
    """One evaluation: each image's path, given label(s) and predicted probabilities."""

    paths: list[str]
    labels: np.ndarray  # (N,) class indices; multi-label: (N, C) 0/1 targets
    probs: np.ndarray  # (N, C) softmax rows; multi-label: each class's sigmoid score
    class_names: list[str]
    thresholds: np.ndarray | None = None  # multi-label: (C,) a class is called at or above its threshold

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


@dataclass
class Mistakes:
    """The rows of the three tables, and why one is shorter than it could be."""

    top_losses: list[dict]  # worst first
    top_images: list[int]  # each top_losses row's image (an index into Evaluated), for the grid
    grid_titles: list[str]
    grid_heading: str
    most_confused: list[dict]
    label_issues: list[dict]  # most likely first
    columns: dict[str, list[str]]  # each CSV's header: SINGLE_COLUMNS or MULTILABEL_COLUMNS
    notes: list[str] = field(default_factory=list)

    @property
    def labels_judged(self) -> bool:
        """False when confident learning could not judge the labels (its note says why): then an empty
        label_issues.csv means "not judged", not "no errors"."""
        return not any(note.startswith(NOT_JUDGED) for note in self.notes)


def find_mistakes(evaluated: Evaluated, count: int = TOP_LOSSES) -> Mistakes:
    """The three tables of `evaluated`; `count` rows of top losses."""
    if evaluated.multilabel:
        return _multilabel_mistakes(evaluated, count)
    return _single_mistakes(evaluated, count)


def write_mistakes(folder: Path, mistakes: Mistakes, load_image: Callable[[int], np.ndarray]) -> list[Path]:
    """top_losses.png, top_losses.csv, most_confused.csv and label_issues.csv in `folder` (each
    written whole or not at all; a table with no rows keeps its header). `load_image(i)`: image i
    as the model saw it, (H, W, 3) uint8 or floats in [0, 1]."""
    from trainer.reporting import plots  # matplotlib: only when drawing

    folder = Path(folder)
    images = [load_image(i) for i in mistakes.top_images]
    written = [plots.image_grid(folder / "top_losses.png", images, mistakes.grid_titles,
                                wrong=[True] * len(images), title=mistakes.grid_heading, empty="no mistakes")]
    for name, rows in (("top_losses.csv", mistakes.top_losses), ("most_confused.csv", mistakes.most_confused),
                       ("label_issues.csv", mistakes.label_issues)):
        written.append(_write_csv(folder / name, mistakes.columns[name], rows))
    return written


def label_issue_lines(rows: list[dict], limit: int | None = None) -> list[str]:
    """The likely label errors as a table for the terminal, most likely first."""
    if not rows:
        return ["no likely label errors found"]
    shown = rows[:limit] if limit else rows
    given = "given_labels" if "given_labels" in rows[0] else "given_label"
    suggested = "suggested_labels" if "suggested_labels" in rows[0] else "suggested_label"
    score, heading = ("label_quality", "quality") if "label_quality" in rows[0] else ("given_label_probability",
                                                                                      "p(given)")
    header = {given: "given", suggested: "suggested"}
    width = [max(len(str(r[k])) for r in [*shown, header]) for k in (given, suggested)]
    lines = [f"{'rank':>4}  {'given':<{width[0]}}  {'suggested':<{width[1]}}  {heading:>8}  path"]
    lines += [f"{r['rank']:>4}  {r[given]:<{width[0]}}  {r[suggested]:<{width[1]}}  {r[score]:>8.4f}  {r['path']}"
              for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more")
    return lines


# ---- one class per image ----

def _single_mistakes(ev: Evaluated, count: int) -> Mistakes:
    names, labels = ev.class_names, ev.labels.astype(np.int64)
    probs = ev.probs.astype(np.float64)
    predicted = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    given = probs[np.arange(len(labels)), labels]  # the probability of the given label
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(given[wrong], kind="stable")][:count]  # least probability on the truth = highest loss
    top, titles = [], []
    for rank, i in enumerate(worst.tolist(), 1):
        loss = _nll(given[i])
        row = {"rank": rank, "path": ev.paths[i], "actual": names[labels[i]], "predicted": names[predicted[i]],
               "probability": _r(probs[i, predicted[i]]), "actual_probability": _r(given[i]), "loss": _r(loss)}
        top.append(row)
        titles.append(f"{row['actual']} / {row['predicted']}\n{probs[i, predicted[i]]:.2f} / loss {loss:.2f}")
    issues, notes = _single_label_issues(ev, labels, probs)
    return Mistakes(top, worst.tolist(), titles, "top losses: actual / predicted, probability / loss",
                    _most_confused(labels, predicted, names), issues, SINGLE_COLUMNS, notes)


def _most_confused(labels: np.ndarray, predicted: np.ndarray, names: list[str]) -> list[dict]:
    """(actual, predicted) pairs of wrong predictions, most frequent first; share: of the actual
    class's images."""
    counts = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    images = counts.sum(1)
    pairs = [(a, p) for a, p in zip(*np.nonzero(counts)) if a != p]
    pairs.sort(key=lambda ap: (-counts[ap], -counts[ap] / images[ap[0]], ap))
    return [{"actual": names[a], "predicted": names[p], "count": int(counts[a, p]),
             "share": _r(counts[a, p] / images[a])} for a, p in pairs]


def _single_label_issues(ev: Evaluated, labels: np.ndarray, probs: np.ndarray) -> tuple[list[dict], list[str]]:
    skipped = _why_not_judged(labels, probs, ev.class_names)
    if skipped:
        return [], [skipped]
    names = ev.class_names
    present, per_class = np.unique(labels, return_counts=True)
    notes = _few_note([names[k] for k, n in zip(present, per_class) if n < FEW_PER_CLASS], "images")
    rows = probs / probs.sum(1, keepdims=True)  # cleanlab's input: each row a distribution (float32 softmax drifts)
    from cleanlab.filter import find_label_issues

    try:
        ranked = _quietly(find_label_issues, labels, rows, return_indices_ranked_by="self_confidence",
                          n_jobs=1)  # one process: forking a training process (CUDA, DDP) is unsafe
    except ValueError as e:  # an input cleanlab refuses that the checks above did not foresee
        return [], notes + [f"{NOT_JUDGED}: cleanlab could not judge these predictions ({e})"]
    issues = []
    for rank, i in enumerate(ranked.tolist(), 1):
        suggested = int(rows[i].argmax())
        issues.append({"path": ev.paths[i], "given_label": names[labels[i]], "suggested_label": names[suggested],
                       "given_label_probability": _r(rows[i, labels[i]]),
                       "suggested_label_probability": _r(rows[i, suggested]), "rank": rank})
    return issues, notes


# ---- any number of classes per image ----

def _multilabel_mistakes(ev: Evaluated, count: int) -> Mistakes:
    names = ev.class_names
    truth, scores = ev.labels.astype(bool), ev.probs.astype(np.float64)
    thresholds = ev.thresholds if ev.thresholds is not None else np.full(len(names), 0.5)
    called = scores >= thresholds
    # Each wrong decision's binary cross-entropy: a missed label -log(score), a false positive -log(1 - score).
    loss = np.where(truth, -np.log(np.clip(scores, 1e-12, 1)), -np.log(np.clip(1 - scores, 1e-12, 1)))
    images, classes = np.nonzero(called != truth)
    order = np.argsort(-loss[images, classes], kind="stable")[:count]
    top, titles = [], []
    for rank, k in enumerate(order.tolist(), 1):
        i, c = int(images[k]), int(classes[k])
        error = "missed" if truth[i, c] else "false positive"
        top.append({"rank": rank, "path": ev.paths[i], "class": names[c], "error": error,
                    "score": _r(scores[i, c]), "threshold": _r(thresholds[c]), "loss": _r(loss[i, c])})
        titles.append(f"{names[c]}: {error}\n{scores[i, c]:.2f} (at {thresholds[c]:.2f}) / loss {loss[i, c]:.2f}")
    per_class = []
    for c, name in enumerate(names):
        positives, missed = int(truth[:, c].sum()), int((truth[:, c] & ~called[:, c]).sum())
        negatives, false_pos = len(truth) - positives, int((~truth[:, c] & called[:, c]).sum())
        if missed or false_pos:
            per_class.append({"class": name, "missed": missed, "missed_share": _r(missed / max(positives, 1)),
                              "false_positives": false_pos, "false_positive_share": _r(false_pos / max(negatives, 1)),
                              "positives": positives, "negatives": negatives})
    per_class.sort(key=lambda r: -(r["missed"] + r["false_positives"]))
    issues, notes = _multilabel_issues(ev, truth, scores, called)
    return Mistakes(top, [int(images[k]) for k in order], titles,
                    "top losses: class: error, score (threshold) / loss", per_class, issues, MULTILABEL_COLUMNS, notes)


def _multilabel_issues(ev: Evaluated, truth: np.ndarray, scores: np.ndarray,
                       called: np.ndarray) -> tuple[list[dict], list[str]]:
    skipped = _why_not_judged(truth, scores, ev.class_names)
    if skipped:
        return [], [skipped]
    names = ev.class_names
    notes = _few_note([n for n, k in zip(names, truth.sum(0)) if k < FEW_PER_CLASS], "labelled images")
    labels = [np.flatnonzero(row).tolist() for row in truth]
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    try:
        ranked = _quietly(find_label_issues, labels, scores, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = _quietly(get_label_quality_scores, labels, scores)
    except ValueError as e:
        return [], notes + [f"{NOT_JUDGED}: cleanlab could not judge these predictions ({e})"]
    issues = [{"path": ev.paths[i], "given_labels": ";".join(names[c] for c in labels[i]),
               "suggested_labels": ";".join(names[c] for c in np.flatnonzero(called[i])),
               "label_quality": _r(quality[i]), "rank": rank} for rank, i in enumerate(ranked.tolist(), 1)]
    return issues, notes


# ---- shared ----

def _why_not_judged(truth: np.ndarray, probs: np.ndarray, class_names: list[str]) -> str | None:
    """Why cleanlab cannot judge these labels (nothing to compare them with), or None."""
    if len(truth) == 0:
        return f"{NOT_JUDGED}: no images were evaluated"
    if truth.ndim == 1 and len(np.unique(truth)) < 2:
        return (f"{NOT_JUDGED}: the evaluated images have fewer than 2 classes, and confident learning "
                "compares the classes' labels")
    if truth.ndim == 2:  # each class is judged against the images without it
        if not truth.any():
            return f"{NOT_JUDGED}: no evaluated image has a label"
        everywhere = [name for name, column in zip(class_names, truth.T) if column.all()]
        if everywhere:
            one = len(everywhere) == 1
            return (f"{NOT_JUDGED}: {', '.join(everywhere[:8])} {'labels' if one else 'label'} every "
                    f"evaluated image, so cleanlab has no image without {'it' if one else 'them'} to compare with")
    if not np.isfinite(probs).all():
        return f"{NOT_JUDGED}: some predicted probabilities are not finite (the model diverged)"
    most = int(truth.sum(0).max()) if truth.ndim == 2 else int(np.bincount(truth).max())
    if most < FEW_PER_CLASS:  # every per-class threshold a guess: nothing to learn from (nor to import cleanlab for)
        return (f"{NOT_JUDGED}: no class has {FEW_PER_CLASS} evaluated images (the most: {most}); "
                "more validation images (e.g. a larger data.val_fraction) let confident learning judge them")
    return None


def _few_note(classes: list[str], what: str) -> list[str]:
    if not classes:
        return []
    shown = ", ".join(classes[:8]) + (f" and {len(classes) - 8} more" if len(classes) > 8 else "")
    return [f"label issues: {shown} have fewer than {FEW_PER_CLASS} {what} here; cleanlab may miss their label "
            "errors (more validation images, e.g. a larger data.val_fraction, judge them better)"]


def _quietly(function, *args, **kwargs):
    # cleanlab warns once per thinly-populated class; the notes say it once, naming the classes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _nll(p: float) -> float:
    return -math.log(max(float(p), 1e-12))


def _r(x) -> float:
    return round(float(x), 6)
