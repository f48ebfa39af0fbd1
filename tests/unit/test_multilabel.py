"""Multi-label data and metrics: the labels CSV (every problem one line naming the CSV line), the
split, mAP / F1 against scikit-learn, the thresholds, and the config rules."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from configs.errors import ConfigError, UsageError
from data.multilabel import discover_multilabel, read_labels_csv
from helpers import make_multilabel_folder, run_in_process
from trainer.build import load_config
from trainer.metrics import average_precision, best_f1_thresholds, multilabel_report


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_multilabel_folder(tmp_path_factory.mktemp("ml"), count=40)


@pytest.mark.parametrize("rows, message", [
    ("images/img_000.png,red\nimages/nope.png,blue\n", "line 3: file images/nope.png does not exist under"),
    ("images/img_000.png,red\nimages/img_001.png,\n", "line 3: images/img_001.png has no labels"),
    ("images/img_000.png, ; \n", "line 2: images/img_000.png has no labels"),
    ("images/img_000.png,red\nimages/img_000.png,blue\n",
     "line 3: images/img_000.png is listed again (first on line 2)"),
    ("images/img_000.png,red;purple\n",
     "line 2: unknown class 'purple' for images/img_000.png (classes: blue, green, red)"),
    (",red\n", "line 2: empty file name"),
])
def test_bad_rows_name_the_csv_line(folder, rows, message):
    csv = folder / "bad.csv"
    csv.write_text("file,labels\n" + rows)
    with pytest.raises(UsageError) as err:
        read_labels_csv(csv, folder, known=["blue", "green", "red"])
    assert str(err.value).startswith(f"{csv} {message}")
    assert "\n" not in str(err.value)


def test_bad_files_name_what_is_expected(folder):
    with pytest.raises(UsageError, match="labels CSV not found: .*missing.csv .*columns file,labels"):
        read_labels_csv(folder / "missing.csv", folder)
    (folder / "header.csv").write_text("path,tags\nimages/img_000.png,red\n")
    with pytest.raises(UsageError, match="line 1: no column 'file' .*expected file,labels"):
        read_labels_csv(folder / "header.csv", folder)
    (folder / "empty.csv").write_text("file,labels\n")
    with pytest.raises(UsageError, match="lists no images"):
        read_labels_csv(folder / "empty.csv", folder)


def test_rows_keep_their_labels_in_order_without_duplicates(folder):
    (folder / "ok.csv").write_text("file,labels\nimages/img_000.png, blue ;red;blue;\n")
    (row,) = read_labels_csv(folder / "ok.csv", folder)
    assert row.line == 2 and row.labels == ("blue", "red") and row.path == (folder / "images/img_000.png").resolve()


def test_the_split_is_stratified_by_first_label_and_deterministic(folder):
    splits = discover_multilabel(folder, "labels.csv", 0.25, seed=3)
    again = discover_multilabel(folder, str(folder / "labels.csv"), 0.25, seed=3)  # absolute path: the same
    assert (splits.train, splits.val) == (again.train, again.val)
    assert splits.classes == ["blue", "green", "red"] and splits.layout == "labels-csv"
    assert len(splits.train) + len(splits.val) == 40 and not set(splits.train) & set(splits.val)
    rows = {str(r.path): r.labels for r in read_labels_csv(folder / "labels.csv", folder)}
    for path, first in splits.train + splits.val:
        assert splits.classes[first] == rows[path][0]  # the sample's label is its first listed label
        assert [splits.classes[i] for i in splits.label_sets[path]] == sorted(rows[path])
    firsts_val = {splits.classes[c] for _, c in splits.val}
    assert len(firsts_val) == len({r[0] for r in rows.values()})  # every first label is in validation
    # Counts: an image counts once for each of its labels.
    assert sum(splits.class_counts("train").values()) == sum(len(rows[p]) for p, _ in splits.train)
    targets = splits.targets(splits.val)
    assert all(t.sum() == len(rows[p]) and t.dtype == torch.float32 for p, t in targets)
    other = discover_multilabel(folder, "labels.csv", 0.25, seed=4)
    assert other.val != splits.val


def scores_with_ties(seed=0, n=200, c=4):
    rng = np.random.default_rng(seed)
    truth = rng.random((n, c)) < 0.35
    scores = np.clip(truth * 0.3 + rng.random((n, c)) * 0.8, 0, 1).round(2)  # rounding makes ties
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32)


def test_average_precision_is_scikit_learns_with_ties():
    scores, truth = scores_with_ties()
    for c in range(scores.shape[1]):
        expected = average_precision_score(truth[:, c].numpy(), scores[:, c].numpy())
        assert average_precision(scores[:, c], truth[:, c]) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(average_precision(scores[:, 0], torch.zeros(len(scores))))


def test_thresholds_maximise_f1_and_the_report_matches_scikit_learn():
    scores, truth = scores_with_ties(seed=1)
    thresholds = best_f1_thresholds(scores, truth)
    for c, t in enumerate(thresholds):
        column = scores[:, c].numpy()
        best = max(f1_score(truth[:, c].numpy(), column >= s) for s in np.unique(column))
        assert f1_score(truth[:, c].numpy(), column >= t) == pytest.approx(best)
        assert not np.any(column == t)  # half-way between two scores, not on one
    report = multilabel_report(scores, truth, ["a", "b", "c", "d"], thresholds)
    predicted = (scores.double().numpy() >= np.array(thresholds)).astype(int)
    assert report["micro_f1"] == pytest.approx(f1_score(truth.numpy(), predicted, average="micro"))
    assert report["macro_f1"] == pytest.approx(f1_score(truth.numpy(), predicted, average="macro"))
    assert report["map"] == pytest.approx(average_precision_score(truth.numpy(), scores.numpy(), average="macro"))
    assert report["per_class"]["b"]["support"] == int(truth[:, 1].sum())
    at_half = multilabel_report(scores, truth, ["a", "b", "c", "d"], [0.5] * 4)
    assert report["macro_f1"] >= at_half["macro_f1"]
    # A class without positives keeps the default threshold.
    assert best_f1_thresholds(scores[:, :1], torch.zeros(len(scores), 1)) == [0.5]


@pytest.mark.parametrize("overrides, message", [
    (["data.mixup_alpha=0.2"], "data.mixup_alpha is for one class per image, not data.task=multilabel"),
    (["train.best_metric=val_acc"], "multi-label runs pick best.safetensors by val_loss"),
    (["data.sampler=balanced"], "data.sampler=balanced is for one class per image"),
    (["train.label_smoothing=0.1"], "train.label_smoothing is for one class per image"),
    (["data.task=multi"], "data.task = 'multi' is not one of: 'single', 'multilabel'"),
])
def test_single_label_options_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", "data.task=multilabel", *overrides])
    assert message in str(err.value)


def test_bad_csv_stops_training_in_one_line_with_nothing_written(folder, tmp_path):
    (folder / "broken.csv").write_text("file,labels\nimages/img_000.png,red\nimages/img_001.png,\n")
    run_dir = tmp_path / "run"
    result = run_in_process("train.py", f"data.root={folder}", "data.task=multilabel", "data.labels_csv=broken.csv",
                            "model.name=tiny_cnn", f"run.dir={run_dir}", "wandb.mode=disabled", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {folder / 'broken.csv'} line 3: images/img_001.png has no labels; give " \
                                    "at least one class name, several separated by ';'"
    assert not run_dir.exists()


def test_the_overfit_check_counts_multilabel_decisions(folder, tmp_path, fresh_accelerate_state):
    from trainer.diagnostics import overfit_one_batch

    cfg = load_config(None, [f"data.root={folder}", "data.task=multilabel", "model.name=tiny_cnn",
                             "data.image_size=16", "data.num_workers=0", "data.batch_size=8", "optim.lr=0.01",
                             "runtime.device=cpu", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled",
                             "data.augment=none", "data.audit=off"])
    result = overfit_one_batch(cfg, 40)
    assert result.images == 8 and result.final_loss < result.first_loss / 2
    assert result.accuracy == 1.0  # every (image, class) decision at 0.5, not top-1 against the first label
