"""evaluate.py, predict.py and export.py on a real tiny run trained from tar shards: `--split val`
gives back the val metrics training recorded; `--shards DIR` evaluates or predicts any shards
folder (training samples flagged); the export checks on the val shards; a damaged or missing
shard or index, other classes or a test split end in one line, exit code 2, nothing written."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from data.folders import discover
from data.shards import read_index
from helpers import (MULTILABEL, make_image_folder, make_multilabel_folder, reset_accelerate_state, run_in_process,
                     run_script)
from trainer.inference.predict import InferenceOptions, predict_files
from trainer.files.model_file import load_classifier, read_metadata


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory):
    """36 images as shards (27 training samples in shards of ~3, 9 validation), one epoch of a tiny CNN on them."""
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    root = tmp_path_factory.mktemp("shards_run")
    images = make_image_folder(root / "images")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IMGTRAIN_AUDIT_DIR", str(root / "audit"))
        made = run_in_process("make_shards.py", f"data.root={images}", "model.name=tiny_cnn", "data.val_fraction=0.25",
                              "--out", str(root / "shards"), "--shard-size", "7KB", cwd=root)
        assert made.returncode == 0, made.stderr
        reset_accelerate_state()
        cfg = load_config(None, [f"data.root={root / 'shards'}", "data.source=shards", f"run.dir={root / 'run'}",
                                 "model.name=tiny_cnn", "data.image_size=16", "data.batch_size=4", "train.epochs=1",
                                 "optim.lr=0.01", "data.num_workers=0", "runtime.device=cpu", "train.precision=no",
                                 "wandb.mode=disabled"])
        train(cfg)
        reset_accelerate_state()
    return root / "run" / "best.safetensors", root / "shards", images


def test_evaluate_split_val_of_a_shards_run_gives_back_its_recorded_val_metrics(shards_run, tmp_path):
    best, shards, _ = shards_run
    # A subprocess with the default two loader workers: forked workers read the tars too.
    result = run_script("evaluate.py", "--checkpoint", str(best), "--split", "val", "--out-dir", str(tmp_path / "ev"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    meta = read_metadata(best)
    recorded = meta["metrics"]
    assert report["images"] == recorded["val_images"] == 9
    assert report["accuracy"] == recorded["val_acc"]
    assert report["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5, abs=1e-6)  # every probability counts
    assert report["source"] == f"the val shards of {read_index(shards).root}"
    assert f"the checkpoint recorded val_acc {recorded['val_acc']:.4f}" in result.stdout
    rows = [r for r in csv.DictReader((best.parent / "per_class_accuracy.csv").open())
            if int(r["epoch"]) == meta["epoch"]]
    assert {r["class"]: int(r["correct"]) for r in rows} == {
        name: report["confusion_matrix"][i][i] for i, name in enumerate(meta["class_names"])}


def test_evaluate_and_predict_a_shards_folder(shards_run, tmp_path):
    best, shards, images = shards_run
    result = run_in_process("evaluate.py", "--checkpoint", str(best), "--shards", str(shards), "--shards-split",
                            "train", "--out-dir", str(tmp_path / "ev"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["images"] == 27 and report["training_images"] == 27
    assert f"warning: 27 of 27 images in the train shards of {read_index(shards).root} were training images" in \
        result.stderr

    out = tmp_path / "preds.csv"
    result = run_in_process("predict.py", "--checkpoint", str(best), "--shards", str(shards), "--out", str(out),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [ref for ref, _ in read_index(shards).samples("val")]  # one per sample
    # Each reference is its source image, in the split's order (make_shards kept the audited val split's).
    sources = [p for p, _ in discover(images, 0.25, 0).val]
    direct = predict_files(load_classifier(best), sources, InferenceOptions(num_workers=0))
    assert [float(r["probability"]) for r in rows] == pytest.approx(direct.probs.max(1).values.tolist(), abs=1e-6)


def _damaged(shards, tmp_path, how: str):
    copy = shutil.copytree(shards, tmp_path / how)
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    if how == "flipped":
        data[600] ^= 0xFF  # same size, one byte of an image changed
        shard.write_bytes(bytes(data))
    elif how == "truncated":
        shard.write_bytes(bytes(data[:1024]))
    elif how == "missing":
        shard.unlink()
    else:
        (copy / "index.json").unlink()
    return copy, shard, len(data)


@pytest.mark.parametrize("how, line", [
    ("flipped", "error: {shard} is damaged: its sha256 differs from index.json's; copy it again or rewrite the shards"),
    ("truncated", "error: {shard} is damaged: 1024 bytes, index.json says {size} (truncated or replaced); copy it "
                  "again or rewrite the shards"),
    ("missing", "error: {shard} is missing (listed in {copy}/index.json)"),
    ("no-index", "error: {copy}/index.json not found: data.source = shards reads a folder written by "
                 "`python launch/make_shards.py --config C.toml --out {copy}`"),
])
def test_bad_shards_end_in_one_line_with_nothing_written(shards_run, tmp_path, how, line):
    best, shards, _ = shards_run
    copy, shard, size = _damaged(shards, tmp_path, how)
    line = line.format(shard=shard, copy=copy, size=size)
    runs = [("evaluate.py", "--shards", str(copy), "--out-dir", str(tmp_path / "out")),
            ("predict.py", "--shards", str(copy), "--out", str(tmp_path / "out")),
            ("evaluate.py", "--split", "val", "--data-root", str(copy), "--out-dir", str(tmp_path / "out"))]
    for script, *args in runs:
        result = run_in_process(script, "--checkpoint", str(best), *args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], (script, result.stderr)
        assert not (tmp_path / "out").exists()


def test_other_classes_and_a_test_split_are_refused_in_one_line(shards_run, tmp_path):
    best, shards, _ = shards_run
    others = make_image_folder(tmp_path / "others", per_class=4, classes=("blue", "green", "purple"))
    made = run_in_process("make_shards.py", f"data.root={others}", "model.name=tiny_cnn", "data.audit=off",
                          "--out", str(tmp_path / "other-shards"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    other = read_index(tmp_path / "other-shards").root
    cases = [(["--shards", str(tmp_path / "other-shards")],
              f"error: the classes of the val shards of {other} are not the checkpoint's (not in the checkpoint: "
              f"purple; not in these: red); evaluate them with a checkpoint of these classes"),
             (["--split", "test"],
              f"error: {read_index(shards).root} holds train and val shards only (launch/make_shards.py writes no "
              f"test split): evaluate test images by naming their folder, or with --csv FILE or --hf DIR")]
    for args, line in cases:
        result = run_in_process("evaluate.py", "--checkpoint", str(best), *args, "--out-dir", str(tmp_path / "out"),
                                cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [line]
        assert not (tmp_path / "out").exists()
    # predict needs no labels: the other shards' samples still get predictions.
    result = run_in_process("predict.py", "--checkpoint", str(best), "--shards", str(tmp_path / "other-shards"),
                            "--out", str(tmp_path / "p.csv"), "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader((tmp_path / "p.csv").open()))) == read_index(tmp_path / "other-shards").splits[
        "val"]["samples"]


def test_export_of_a_shards_run_checks_on_its_val_shards(shards_run, tmp_path):
    pytest.importorskip("onnxruntime")
    best, shards, _ = shards_run
    result = run_in_process("export.py", "--checkpoint", str(best), "--format", "onnx", "--out",
                            str(tmp_path / "export"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch on 9 images" in result.stdout and "random inputs" not in result.stderr
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"Measured at export on the val shards of {read_index(shards).root} (9 images)" in card
    assert "| blue | 9 | 3 |" in card  # class counts from the index: 9 train, 3 val
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["checked_on"] == f"9 images of the val shards of {read_index(shards).root}"


def test_multilabel_rows_are_not_written_to_shards_that_hold_one_label(tmp_path):
    images = make_multilabel_folder(tmp_path / "multi", count=12)
    result = run_in_process("make_shards.py", f"data.root={images}", "model.name=tiny_cnn", *MULTILABEL,
                            "--out", str(tmp_path / "shards"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: shards hold one class index per sample, so multi-label rows cannot be written to them; train "
        "multi-label runs from the CSV source (data.source = csv)"]
    assert not (tmp_path / "shards").exists()
