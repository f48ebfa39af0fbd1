"""The multi-label demo end to end: images whose red, green and blue channels are independently on
or off, a tiny CNN trained through launch/train.py, then predict.py and evaluate.py on it, each a
subprocess as a user runs it (evaluate.py's second report, on a CSV, in-process)."""

import csv
import json

from helpers import MULTILABEL, make_multilabel_folder, run_in_process, run_script
from trainer.files.model_file import read_metadata

CLASSES = ["blue", "green", "red"]


def truth_of(folder):
    rows = csv.DictReader((folder / "labels.csv").open())
    return {r["file"]: set(r["labels"].split(";")) for r in rows}


def test_a_tiny_cnn_learns_multilabel_colors_and_predict_evaluate_use_its_thresholds(tmp_path):
    data = make_multilabel_folder(tmp_path / "data", count=96, seed=0)
    held_out = make_multilabel_folder(tmp_path / "held_out", count=40, seed=1)
    run_dir = tmp_path / "run"
    result = run_script("train.py", f"data.root={data}", *MULTILABEL, "model.name=tiny_cnn",
                        "data.image_size=16", "data.num_workers=0", "train.epochs=4", "optim.lr=0.01",
                        "data.batch_size=auto", f"run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch size auto: found 32 per process (no CUDA device, the default 32)" in result.stdout
    assert "val_map  val_f1_micro  val_f1_macro" in result.stdout and "train_acc" not in result.stdout
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4 and history[-1]["val_map"] > 0.9 and history[-1]["val_f1_macro"] > 0.8
    assert "val_acc" not in history[-1] and set(history[-1]["val_thresholds"]) == set(CLASSES)
    assert "batch_size = 32\n" in (run_dir / "config.toml").read_text()  # the number, never "auto"

    meta = read_metadata(run_dir / "best.safetensors")
    best = next(h for h in history if h["epoch"] == meta["epoch"])
    assert meta["task"] == "multilabel" and meta["class_names"] == CLASSES
    assert meta["thresholds"] == [best["val_thresholds"][c] for c in CLASSES]

    # predict.py: every class at or above its threshold, in a labels column.
    out = tmp_path / "tags.csv"
    result = run_script("predict.py", "--checkpoint", str(run_dir / "best.safetensors"), str(held_out / "images"),
                        "--out", str(out), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "labels", "scores_top3", "error"] and len(rows) == 40
    truth = truth_of(held_out)
    exact = sum(set(r["labels"].split(";")) - {""} == truth["images/" + r["path"].rsplit("/", 1)[1]] for r in rows)
    assert exact >= 30, f"{exact} of 40 label sets exactly right"
    for r in rows:  # the labels are the scores at or above the recorded thresholds
        scores = dict(item.split(":") for item in r["scores_top3"].split(";"))
        called = {c for c in CLASSES if float(scores[c]) >= meta["thresholds"][CLASSES.index(c)] + 1e-4}
        assert called <= set(r["labels"].split(";"))

    # evaluate.py on the run's own validation split gives back the recorded mAP and F1.
    result = run_script("evaluate.py", "--checkpoint", str(run_dir / "best.safetensors"), "--split", "val",
                        "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "eval-val" / "metrics.json").read_text())
    assert abs(report["map"] - best["val_map"]) < 1e-6 and abs(report["macro_f1"] - best["val_f1_macro"]) < 1e-6
    assert abs(report["loss"] - best["val_loss"]) < 1e-4

    # ... and on a held-out labelled CSV: per-class precision / recall / F1 / AP (in-process: the same
    # entry point ran as a process just above).
    result = run_in_process("evaluate.py", "--checkpoint", str(run_dir / "best.safetensors"), "--csv",
                            str(held_out / "labels.csv"),
                            "--out-dir", str(tmp_path / "eval"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["task"] == "multilabel" and report["images"] == 40 and report["map"] > 0.9
    assert set(report["per_class"]) == set(CLASSES)
    keys = {"precision", "recall", "f1", "ap", "support", "threshold"}
    assert all(keys <= set(m) for m in report["per_class"].values())
    assert "class  precision  recall      f1      AP  threshold  support" in result.stdout
    print(f"held-out: mAP {report['map']:.4f}, micro F1 {report['micro_f1']:.4f}, macro F1 {report['macro_f1']:.4f}")

    # A class the checkpoint does not know is bad input: one line naming it, exit 2 (in-process: it
    # ends before any work; evaluate.py ran as a process above).
    (held_out / "extra.csv").write_text("file,labels\nimages/img_000.png,red;purple\n")
    result = run_in_process("evaluate.py", "--checkpoint", str(run_dir / "best.safetensors"), "--csv",
                        str(held_out / "extra.csv"), "--out-dir", str(tmp_path / "eval2"), cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "eval2").exists()
    assert result.stderr.strip().splitlines()[-1] == (f"error: label 'purple' of img_000.png in "
                                                      f"{held_out.resolve() / 'extra.csv'} is not a class of this "
                                                      "checkpoint (blue, green, red)")
