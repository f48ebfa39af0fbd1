"""What the model gets wrong (trainer/reporting/mistakes.py): the top losses, the most-confused
pairs and cleanlab's likely label errors, from a training run's end and from evaluate.py."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest

from trainer.assemble.run_config import load_config
from helpers import make_image_folder, run_in_process
from trainer.reporting.mistakes import (FEW_PER_CLASS, MISTAKE_FILES, Evaluated, find_mistakes,
                                        label_issue_lines, write_mistakes)

NAMES = ["cat", "dog", "fox"]


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _gray(i: int) -> np.ndarray:
    return np.full((8, 8, 3), 40 * i % 256, dtype=np.uint8)


def test_single_label_tables_rank_the_worst_mistakes_and_the_most_confused_pairs(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1],  # cat, right
                      [0.1, 0.8, 0.1],  # dog, right
                      [0.6, 0.3, 0.1],  # dog taken for a cat (p(dog) 0.3)
                      [0.9, 0.05, 0.05],  # dog taken for a cat, surer (p(dog) 0.05): the worst
                      [0.2, 0.2, 0.6],  # cat taken for a fox (p(cat) 0.2)
                      [0.1, 0.1, 0.8]])  # fox, right
    labels = np.array([0, 1, 1, 1, 0, 2])
    evaluated = Evaluated([f"img{i}.png" for i in range(6)], labels, probs, NAMES)
    found = find_mistakes(evaluated, count=2)
    assert [r["path"] for r in found.top_losses] == ["img3.png", "img4.png"] and found.top_images == [3, 4]
    assert found.top_losses[0] == {"rank": 1, "path": "img3.png", "actual": "dog", "predicted": "cat",
                                   "probability": 0.9, "actual_probability": 0.05, "loss": round(-math.log(0.05), 6)}
    assert found.grid_titles[0] == "dog / cat\n0.90 / loss 3.00"
    assert found.most_confused == [{"actual": "dog", "predicted": "cat", "count": 2, "share": round(2 / 3, 6)},
                                   {"actual": "cat", "predicted": "fox", "count": 1, "share": 0.5}]
    written = write_mistakes(tmp_path, found, _gray)
    assert sorted(p.name for p in written) == sorted(MISTAKE_FILES)
    assert (tmp_path / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["path"] for r in _rows(tmp_path / "top_losses.csv")] == ["img3.png", "img4.png"]
    assert _rows(tmp_path / "most_confused.csv")[0] == {"actual": "dog", "predicted": "cat", "count": "2",
                                                        "share": str(round(2 / 3, 6))}
    header = (tmp_path / "label_issues.csv").read_text().splitlines()[0]
    assert header == "path,given_label,suggested_label,given_label_probability,suggested_label_probability,rank"
    assert not list(tmp_path.glob(".*tmp*"))  # every file written whole


def test_multilabel_tables_are_per_class_misses_and_false_positives(tmp_path):
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.2],  # fox missed (0.2 < 0.5)
                       [0.1, 0.8, 0.1],  # right
                       [0.7, 0.6, 0.95],  # fox called, not labelled: the worst (-log 0.05)
                       [0.1, 0.1, 0.7]])  # right
    evaluated = Evaluated([f"img{i}.png" for i in range(4)], truth, scores, NAMES, np.array([0.5, 0.5, 0.5]))
    found = find_mistakes(evaluated)
    assert [(r["path"], r["class"], r["error"]) for r in found.top_losses] == [
        ("img2.png", "fox", "false positive"), ("img0.png", "fox", "missed")]
    assert found.top_losses[0]["loss"] == round(-math.log(0.05), 6) and found.top_images == [2, 0]
    assert found.most_confused == [{"class": "fox", "missed": 1, "missed_share": 0.5, "false_positives": 1,
                                    "false_positive_share": 0.5, "positives": 2, "negatives": 2}]
    write_mistakes(tmp_path, found, _gray)
    assert _rows(tmp_path / "top_losses.csv")[1]["error"] == "missed"
    assert (tmp_path / "label_issues.csv").read_text().splitlines()[0] == \
        "path,given_labels,suggested_labels,label_quality,rank"


def _blobs(seed: int = 0, classes: int = 4, per_class: int = 75, swaps: int = 15):
    """Well separated clusters, a few labels swapped to another class, and out-of-sample
    probabilities of a real model: 5-fold cross-validated logistic regression (each image's
    probabilities come from a model that never saw it, as a validation split's do)."""
    from sklearn.datasets import make_blobs
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x, truth = make_blobs(n_samples=classes * per_class, centers=classes, cluster_std=1.0, random_state=seed)
    rng = np.random.default_rng(seed)
    swapped = rng.choice(len(truth), swaps, replace=False)
    given = truth.copy()
    given[swapped] = (truth[swapped] + rng.integers(1, classes, swaps)) % classes
    probs = cross_val_predict(LogisticRegression(max_iter=1000), x, given, cv=5, method="predict_proba")
    return given, probs, set(swapped.tolist()), truth


def test_cleanlab_lists_most_of_the_deliberately_swapped_labels(capsys):
    given, probs, swapped, truth = _blobs()
    names = ["a", "b", "c", "d"]
    found = find_mistakes(Evaluated([f"img_{i}.png" for i in range(len(given))], given, probs, names))
    listed = [int(r["path"][4:-4]) for r in found.label_issues]
    hits = swapped & set(listed)
    with capsys.disabled():
        print(f"\ncleanlab (logistic regression, 5-fold out-of-sample): found {len(hits)} of {len(swapped)} swapped "
              f"labels, {len(listed) - len(hits)} other images listed, of {len(given)}")
    assert len(hits) >= 0.8 * len(swapped) and len(listed) <= 2 * len(swapped)
    assert [r["rank"] for r in found.label_issues] == list(range(1, len(listed) + 1))
    first = found.label_issues[0]
    assert list(first)[0] == "path" and first["given_label"] == names[given[listed[0]]]
    # Ranked by the probability of the given label, lowest first; the suggestion is the model's class.
    assert [r["given_label_probability"] for r in found.label_issues] == sorted(
        r["given_label_probability"] for r in found.label_issues)
    assert sum(names[truth[i]] == r["suggested_label"] for i, r in zip(listed, found.label_issues) if i in swapped) \
        >= 0.8 * len(hits)


def test_cleanlab_lists_most_swapped_labels_of_a_multilabel_set(capsys):
    """Three independent yes/no classes read from noisy features; one class flipped on 12 images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    rng = np.random.default_rng(1)
    truth = rng.random((300, 3)) < 0.4
    x = truth * 4.0 + rng.normal(size=truth.shape)
    given = truth.copy()
    flipped = rng.choice(len(truth), 12, replace=False)
    given[flipped, rng.integers(0, 3, 12)] ^= True
    scores = np.stack([cross_val_predict(LogisticRegression(), x, given[:, c], cv=5, method="predict_proba")[:, 1]
                       for c in range(3)], axis=1)
    found = find_mistakes(Evaluated([f"img_{i}.png" for i in range(300)], given.astype(np.float32), scores, NAMES))
    listed = {int(r["path"][4:-4]) for r in found.label_issues}
    hits = listed & set(flipped.tolist())
    with capsys.disabled():
        print(f"\ncleanlab multi-label: found {len(hits)} of {len(flipped)} flipped labels, "
              f"{len(listed) - len(hits)} other images listed, of {len(given)}")
    assert len(hits) >= 0.75 * len(flipped) and len(listed) <= 2 * len(flipped)


@pytest.mark.parametrize("labels, probs, note", [
    (np.zeros(0, dtype=int), np.zeros((0, 3)), "no images were evaluated"),
    (np.array([1, 1, 1]), np.full((3, 3), 1 / 3), "fewer than 2 classes"),
    (np.array([0]), np.array([[0.2, 0.8, 0.0]]), "fewer than 2 classes"),
    (np.array([0, 1, 2, 0]), np.array([[np.nan, 0.5, 0.5]] * 4), "not finite"),
    (np.array([0] * 5 + [1, 1]), np.array([[0.9, 0.1, 0.0]] * 4 + [[0.3, 0.7, 0.0]] + [[0.2, 0.8, 0.0]] * 2),
     f"dog have fewer than {FEW_PER_CLASS} images here"),
    (np.array([0, 0, 1, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.6, 0.4, 0.0]]),
     f"no class has {FEW_PER_CLASS} evaluated images (the most: 2)"),
    (np.array([[0, 0, 0], [0, 0, 0]]), np.full((2, 3), 0.3), "no evaluated image has a label"),
    (np.array([[1, 0, 0], [1, 1, 0]]), np.full((2, 3), 0.3), "cat labels every evaluated image"),
    (np.array([[1, 0, 0]] * 5 + [[0, 1, 0]]), np.full((6, 3), 0.3), "dog, fox have fewer than 5 labelled images"),
    (np.array([[1, 0, 0], [0, 1, 0]]), np.full((2, 3), 0.3), "no class has 5 evaluated images (the most: 1)"),
], ids=["empty", "one-class", "one-image", "nan", "few-per-class", "no-class-has-enough", "multilabel-unlabelled",
        "multilabel-everywhere", "multilabel-few", "multilabel-no-class-has-enough"])
def test_small_or_broken_evaluations_get_a_note_not_a_crash(tmp_path, labels, probs, note):
    found = find_mistakes(Evaluated([f"img{i}.png" for i in range(len(labels))], labels, probs, NAMES))
    assert any(note in n for n in found.notes), found.notes
    write_mistakes(tmp_path, found, _gray)
    assert all((tmp_path / name).is_file() for name in MISTAKE_FILES)  # a table without rows keeps its header


def test_the_terminal_list_of_label_issues():
    rows = [{"path": "a/x.png", "given_label": "cat", "suggested_label": "dog", "given_label_probability": 0.01,
             "suggested_label_probability": 0.98, "rank": 1},
            {"path": "b/y.png", "given_label": "dog", "suggested_label": "fox", "given_label_probability": 0.2,
             "suggested_label_probability": 0.7, "rank": 2}]
    assert label_issue_lines(rows, 1) == ["rank  given  suggested  p(given)  path",
                                          "   1  cat    dog          0.0100  a/x.png", "... 1 more"]
    assert label_issue_lines([]) == ["no likely label errors found"]


def test_a_training_run_and_evaluate_list_the_swapped_validation_images(tmp_path, fresh_accelerate_state, capsys):
    """A real tiny run whose validation folder has 3 images filed under the wrong class: the run
    folder gets the grid and the three tables of its best epoch, the swapped images among the
    label issues; evaluate.py --split val --label-issues lists the same images."""
    from trainer.fit.loop import train

    data = make_image_folder(tmp_path / "images", per_class=24, layout="split-folders", seed=3)  # 8 val per class
    swaps = [("red", "green", 0), ("green", "blue", 1), ("blue", "red", 2)]
    moved = []
    for src, dst, i in swaps:
        target = data / "val" / dst / f"{src}_{i:03d}.png"
        shutil.move(data / "val" / src / f"{src}_{i:03d}.png", target)
        moved.append(target.name)
    run = tmp_path / "run"
    cfg = load_config(None, [f"data.root={data}", "model.name=tiny_cnn", "data.image_size=16", "data.num_workers=0",
                             "data.batch_size=8", "optim.lr=0.01", "train.epochs=3", "runtime.device=cpu",
                             f"run.dir={run}", "wandb.mode=disabled", "data.augment=none"])
    train(cfg)
    out = capsys.readouterr().out
    assert all((run / name).is_file() for name in MISTAKE_FILES)
    issues = _rows(run / "label_issues.csv")
    listed = [r["path"].rsplit("/", 1)[-1] for r in issues]
    hits = set(listed) & set(moved)
    with capsys.disabled():
        print(f"\ntiny_cnn, 3 epochs: found {len(hits)} of {len(moved)} swapped validation labels, "
              f"{len(listed) - len(hits)} other images listed, of 24")
    assert len(hits) >= 2, issues
    assert f"likely label errors among the validation images (cleanlab): {run / 'label_issues.csv'}" in out
    top = _rows(run / "top_losses.csv")
    assert {r["path"].rsplit("/", 1)[-1] for r in top} >= hits  # a swapped label is a confident mistake

    result = run_in_process("evaluate.py", "--checkpoint", str(run / "best.safetensors"), "--split", "val",
                            "--label-issues", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evaluated = run / "eval-val"
    assert [r["path"] for r in _rows(evaluated / "label_issues.csv")] == [r["path"] for r in issues]
    assert (evaluated / "label_issues.txt").read_text().splitlines() == [r["path"] for r in issues]
    assert all((evaluated / name).is_file() for name in MISTAKE_FILES)
    assert "p(given)" in result.stdout and all(name in result.stdout for name in hits)


class _Images:
    """A validation dataset's face: its samples and (uint8 image, label) items."""

    def __init__(self, count: int):
        self.samples = [(f"val/img{i}.png", 0) for i in range(count)]

    def __getitem__(self, i: int):
        import torch

        return torch.full((3, 8, 8), 30 * i, dtype=torch.uint8), 0


def _tracking(run_dir, logged: list):
    from types import SimpleNamespace

    from trainer.reporting.tracking import RunTracking

    accelerator = SimpleNamespace(is_main_process=True, log=logged.append)
    cfg = SimpleNamespace(wandb=SimpleNamespace(project="p", log_model=False))
    tracking = RunTracking(accelerator, cfg, run_dir, NAMES, SimpleNamespace(mean=(0, 0, 0), std=(1, 1, 1)))
    tracking.tracker = SimpleNamespace(run=SimpleNamespace())  # a W&B run as far as logging goes
    return tracking


def test_a_runs_end_writes_the_best_epochs_tables_and_logs_them_to_wandb(tmp_path):
    from types import SimpleNamespace

    import wandb

    logged = []
    tracking = _tracking(tmp_path, logged)
    predictions = SimpleNamespace(labels=np.array([0, 1, 2, 2]), probs=np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    written, lines = tracking.mistakes(predictions, _Images(4), {"epoch": 3})
    assert sorted(p.name for p in written) == sorted(MISTAKE_FILES)
    assert _rows(tmp_path / "top_losses.csv")[0]["path"] == "val/img2.png"
    # Four images: the labels are not judged, and no "0 likely label errors" reads as "none found".
    assert lines == [f"note: label issues: not judged: no class has 5 evaluated images (the most: 2); more "
                     "validation images (e.g. a larger data.val_fraction) let confident learning judge them"]
    (values,) = logged
    assert values["epoch"] == 3 and isinstance(values["media/top_losses"], wandb.Image)
    assert values["media/most_confused"].columns == ["actual", "predicted", "count", "share"]
    assert values["media/top_losses_table"].data[0][1] == "val/img2.png"
    assert len(values["media/most_confused"].data) == 1
    assert values["media/label_issues"].columns[0] == "path"
    # A resumed run whose best epoch came before the resume keeps the files its first part wrote,
    # and says how to get them when there are none.
    assert tracking.mistakes(None, _Images(4), {"epoch": 3}) == (written, [])
    assert "launch/evaluate.py" in _tracking(tmp_path / "other", []).mistakes(None, _Images(4), {"epoch": 2})[1][0]
    # Predictions that do not match the validation images are never paired with them.
    assert "left out" in tracking.mistakes(predictions, _Images(5), {"epoch": 3})[1][0]
