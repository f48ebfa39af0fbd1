"""A recorded class order wins over the class-order rule. A run of classes named 1, 2 and 10,
trained as the code before the rule did (text order: 1, 10, 2), resumes under today's rule (which
would say 1, 2, 10) in its own order, bit for bit like an uninterrupted run of the old code; its
checkpoint evaluates its own split to the val_acc it recorded and predicts in its own order."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import make_image_folder, reset_accelerate_state, run_in_process
from resume_runs import assert_same_bits, metrics_without_timing
from trainer.files.model_file import load_classifier, read_metadata
from trainer.inference.predict import InferenceOptions, predict_files

NAMES = ("1", "2", "10")
AS_TEXT = ["1", "10", "2"]  # what folders were sorted into before the rule
BY_RULE = ["1", "2", "10"]


def _train(images, run_dir, epochs: int, *extra: str, old_code: bool, monkeypatch):
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    with monkeypatch.context() as patch:
        if old_code:  # discovery as it was: class folders sorted as text, nothing recorded to follow
            patch.setattr("data.folders.class_order", lambda names, recorded=None: sorted(names))
        reset_accelerate_state()
        train(load_config(None, [f"data.root={images}", f"run.dir={run_dir}", "model.name=tiny_cnn",
                                 "data.image_size=16", "data.batch_size=4", "data.val_fraction=0.34",
                                 "data.num_workers=0", f"train.epochs={epochs}", "optim.lr=0.01", "runtime.device=cpu",
                                 "train.precision=no", "wandb.mode=disabled", *extra]))
        reset_accelerate_state()


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
    """The old code's uninterrupted 2-epoch run, and its 1-epoch run resumed to 2 epochs by today's code."""
    root = tmp_path_factory.mktemp("recorded")
    images = make_image_folder(root / "images", per_class=6, classes=NAMES)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _train(images, root / "reference", 2, old_code=True, monkeypatch=monkeypatch)
        _train(images, root / "resumed", 1, old_code=True, monkeypatch=monkeypatch)
        assert read_metadata(root / "resumed" / "last.safetensors")["class_names"] == AS_TEXT
        _train(images, root / "resumed", 2, "run.resume=auto", old_code=False, monkeypatch=monkeypatch)
    return root


def test_a_resumed_run_keeps_the_order_its_checkpoint_recorded(old_runs):
    reference, resumed = old_runs / "reference", old_runs / "resumed"
    assert read_metadata(resumed / "last.safetensors")["class_names"] == AS_TEXT
    newest = sorted((resumed / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "state.json").read_text())["class_names"] == AS_TEXT
    # The data was built in the recorded order: every label as the old code gave it.
    assert_same_bits(reference / "last.safetensors", resumed / "last.safetensors")
    assert metrics_without_timing(resumed) == metrics_without_timing(reference)


def test_the_checkpoint_evaluates_and_predicts_in_its_own_order(old_runs, tmp_path):
    best = old_runs / "resumed" / "best.safetensors"
    recorded = read_metadata(best)["metrics"]
    result = run_in_process("evaluate.py", "--checkpoint", str(best), "--split", "val", "--out-dir",
                            str(tmp_path / "ev"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["images"] == recorded["val_images"] and report["accuracy"] == recorded["val_acc"]
    assert report["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5, abs=1e-6)
    assert list(report["per_class"]) == AS_TEXT

    # A labelled folder of the run's class names: each image's label is its folder's place in the recorded list.
    result = run_in_process("evaluate.py", "--checkpoint", str(best), str(old_runs / "images"), "--out-dir",
                            str(tmp_path / "ev-folder"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    by_folder = json.loads((tmp_path / "ev-folder" / "metrics.json").read_text())
    assert {name: m["support"] for name, m in by_folder["per_class"].items()} == dict.fromkeys(AS_TEXT, 6)

    out = tmp_path / "preds.csv"
    result = run_in_process("predict.py", "--checkpoint", str(best), str(old_runs / "images"), "--out", str(out),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    loaded = load_classifier(best)
    direct = predict_files(loaded, [r["path"] for r in rows], InferenceOptions(num_workers=0))
    assert [r["class"] for r in rows] == [AS_TEXT[i] for i in direct.probs.argmax(1).tolist()]
    assert BY_RULE != AS_TEXT  # what today's rule would have made of the same folders
