"""Multi-label data and metrics: the CSV source's ';'-separated labels (unusable rows left out
naming the CSV line), the split, mAP / F1 against scikit-learn, the thresholds, and the config rules."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from configs.errors import ConfigError, UsageError
from configs.schema import DataConfig
from data.sources import label_names, load_splits
from helpers import MULTILABEL, make_multilabel_folder, run_in_process
from trainer.assemble.run_config import load_config
from trainer.task.metrics import average_precision, best_f1_thresholds, multilabel_report


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_multilabel_folder(tmp_path_factory.mktemp("ml"), count=40)


def _splits(folder, csv="labels.csv", **kw):
    return load_splits(DataConfig(root=str(folder), task="multilabel", source="csv", csv=csv,
                                  csv_label_column="labels", val_fraction=0.25, **kw))


def test_rows_that_cannot_be_used_are_left_out_naming_the_csv_line(folder):
    rows = (folder / "labels.csv").read_text().splitlines()
    extra = ["images/nope.png,blue", "images/img_001.png, ; ", f"{rows[1].split(',')[0]},red;green;blue",
             rows[2], ",red"]
    (folder / "bad.csv").write_text("\n".join([*rows, *extra]) + "\n")
    splits = _splits(folder, "bad.csv")
    n = len(rows)
    found = {(p["problem"], p["detail"].split(":")[0]) for p in splits.source_problems}
    assert found == {("missing", f"bad.csv line {n + 1}"), ("no_label", f"bad.csv line {n + 2}"),
                     ("conflicting_labels", "bad.csv line 2"), ("conflicting_labels", f"bad.csv line {n + 3}"),
                     ("duplicate_row", f"bad.csv line {n + 4}"), ("missing", f"bad.csv line {n + 5}")}
    assert len(splits.train) + len(splits.val) == 39  # img_000 is listed under two label sets: left out


def test_bad_csv_files_say_what_is_expected(folder):
    with pytest.raises(UsageError, match="data.csv not found: .*missing.csv"):
        _splits(folder, "missing.csv")
    (folder / "header.csv").write_text("path,tags\nimages/img_000.png,red\n")
    with pytest.raises(UsageError, match="has no column 'file' .*set data.csv_file_column"):
        _splits(folder, "header.csv")
    (folder / "empty.csv").write_text("file,labels\n")
    with pytest.raises(UsageError, match="has no data rows"):
        _splits(folder, "empty.csv")


def test_a_rows_labels_keep_their_order_without_blanks_or_repeats():
    assert label_names(" blue ;red;blue;", multilabel=True) == ("blue", "red")
    assert label_names(" ; ", multilabel=True) == ()


def test_the_split_is_stratified_by_first_label_and_deterministic(folder):
    splits = _splits(folder, seed=3)
    again = _splits(folder, str(folder / "labels.csv"), seed=3)  # absolute path: the same
    assert (splits.train, splits.val) == (again.train, again.val)
    assert splits.classes == ["blue", "green", "red"] and splits.layout == "csv"
    assert len(splits.train) + len(splits.val) == 40 and not set(splits.train) & set(splits.val)
    lines = [line.split(",") for line in (folder / "labels.csv").read_text().splitlines()[1:]]
    rows = {str((folder / f).resolve()): tuple(labels.split(";")) for f, labels in lines}
    for path, first in splits.train + splits.val:
        assert splits.classes[first] == rows[path][0]  # the sample's label is its first listed label
        assert [splits.classes[i] for i in splits.label_sets[path]] == sorted(rows[path])
    firsts_val = {splits.classes[c] for _, c in splits.val}
    assert len(firsts_val) == len({r[0] for r in rows.values()})  # every first label is in validation
    # Counts: an image counts once for each of its labels.
    assert sum(splits.class_counts("train").values()) == sum(len(rows[p]) for p, _ in splits.train)
    targets = splits.targets(splits.val)
    assert all(t.sum() == len(rows[p]) and t.dtype == torch.float32 for p, t in targets)
    other = _splits(folder, seed=4)
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
    (["train.best_metric=val_acc"], "train.best_metric = 'val_acc' is not a metric of data.task = multilabel; "
                                    "use one of: 'val_loss', 'val_map'"),
    (["data.sampler=balanced"], "data.sampler=balanced is for one class per image"),
    (["train.label_smoothing=0.1"], "train.label_smoothing is for one class per image"),
    (["data.task=multi"], "data.task = 'multi' is not one of: 'single', 'multilabel'"),
])
def test_single_label_options_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", *MULTILABEL, *overrides])
    assert message in str(err.value)


def test_bad_csv_stops_training_in_one_line_with_nothing_written(folder, tmp_path):
    run_dir = tmp_path / "run"
    result = run_in_process("train.py", f"data.root={folder}", *MULTILABEL[:3], "model.name=tiny_cnn",
                            f"run.dir={run_dir}", "wandb.mode=disabled", cwd=tmp_path)  # its column is "labels"
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {folder.resolve() / 'labels.csv'} has no column 'label' (its columns: " \
                                    "file, labels); set data.csv_label_column to the right one"
    assert not run_dir.exists()


def test_multilabel_needs_the_csv_source():
    with pytest.raises(ConfigError, match="data.task=multilabel reads each image's labels from a CSV: set "
                                          "data.source=csv"):
        load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", "data.task=multilabel"])


def test_the_overfit_check_counts_multilabel_decisions(folder, tmp_path, fresh_accelerate_state):
    from trainer.fit.diagnostics import overfit_one_batch

    cfg = load_config(None, [f"data.root={folder}", *MULTILABEL, "model.name=tiny_cnn",
                             "data.image_size=16", "data.num_workers=0", "data.batch_size=8", "optim.lr=0.01",
                             "runtime.device=cpu", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled",
                             "data.augment=none", "data.audit=off"])
    result = overfit_one_batch(cfg, 40)
    assert result.images == 8 and result.final_loss < result.first_loss / 2
    assert result.accuracy == 1.0  # every (image, class) decision at 0.5, not top-1 against the first label


def test_ema_weights_of_a_multilabel_run_are_scored_and_recorded_with_their_own_thresholds(folder, tmp_path,
                                                                                          fresh_accelerate_state):
    from trainer.fit.loop import train
    from trainer.files.model_file import read_metadata

    cfg = load_config(None, [f"data.root={folder}", *MULTILABEL, "model.name=tiny_cnn", "data.image_size=16",
                             "data.num_workers=0", "data.batch_size=8", "optim.lr=0.01", "train.epochs=2",
                             "train.ema_decay=0.9", "runtime.device=cpu", f"run.dir={tmp_path / 'run'}",
                             "wandb.mode=disabled", "data.audit=off"])
    result = train(cfg)
    last = result.history[-1]
    assert {"ema_val_loss", "ema_val_map", "ema_val_f1_macro", "ema_val_thresholds"} <= set(last)
    ema = read_metadata(tmp_path / "run" / "ema.safetensors")
    assert ema["metrics"]["val_map"] == last["ema_val_map"]
    assert ema["thresholds"] == [last["ema_val_thresholds"][c] for c in ema["class_names"]]
