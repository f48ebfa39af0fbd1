"""evaluate.py on a run's own split gives back what training measured; a folder holding training
images is flagged; a checkpoint with torch.compile's key prefixes predicts."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from data.transforms import Preprocessing
from helpers import COLORS, make_image_folder, run_in_process, run_script
from models import HeadSpec, build_classifier
from data.sources import audited_splits
from trainer.assemble.run_config import load_config
from trainer.inference.evaluate import run_config
from trainer.inference.predict import training_images_among
from trainer.fit.loop import train
from trainer.files.model_file import ClassifierFacts, load_classifier, read_metadata, save_classifier


def _wide_image_folder(root, per_class=6, seed=0):
    """24x16 images: center crop, squash and pad-to-square each show the model different pixels."""
    rng = np.random.default_rng(seed)
    for name, channel in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 110, size=(16, 24, 3), dtype=np.uint8)
            pixels[:, :12, channel] = rng.integers(120, 256, size=(16, 12), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


def _train(root, run_dir, augment, epochs=1):
    cfg = load_config(None, [f"data.root={root}", f"run.dir={run_dir}", "model.name=tiny_cnn", "data.image_size=16",
                             "data.batch_size=4", "data.num_workers=0", f"train.epochs={epochs}", "optim.lr=0.01",
                             f"data.augment={augment}", "data.val_fraction=0.34", "runtime.device=cpu",
                             "train.precision=no", "wandb.mode=disabled"])
    train(cfg)
    return run_dir / "best.safetensors"


# evaluate.py runs as a process once; the other crop modes run the same entry point in-process.
@pytest.mark.parametrize("augment,crop_mode,runner", [("standard", "center", run_script),
                                                      ("stretch", "squash", run_in_process),
                                                      ("square", "border", run_in_process)],
                         ids=["standard-center", "stretch-squash", "square-border"])
def test_evaluate_split_val_gives_back_the_recorded_val_acc(tmp_path, augment, crop_mode, runner):
    root = _wide_image_folder(tmp_path / "images")
    best = _train(root, tmp_path / "run", augment)
    meta = read_metadata(best)
    assert meta["preprocessing"]["crop_mode"] == crop_mode

    result = runner("evaluate.py", "--checkpoint", str(best), "--split", "val", "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "eval-val" / "metrics.json").read_text())
    recorded = meta["metrics"]
    assert report["images"] == recorded["val_images"] == 6
    assert report["accuracy"] == recorded["val_acc"]
    # The loss sees every probability: any other transform than validation's would move it.
    assert report["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5, abs=1e-6)
    assert f"the checkpoint recorded val_acc {recorded['val_acc']:.4f}" in result.stdout
    assert "training images" not in result.stderr
    # Per-class counts as training recorded them for that epoch.
    rows = [r for r in csv.DictReader((tmp_path / "run" / "per_class_accuracy.csv").open())
            if int(r["epoch"]) == meta["epoch"]]
    assert {r["class"]: int(r["correct"]) for r in rows} == {
        name: report["confusion_matrix"][i][i] for i, name in enumerate(meta["class_names"])}


def test_evaluate_warns_when_the_folder_holds_training_images(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=6)
    best = _train(root, tmp_path / "run", "standard")
    # In-process: evaluate.py on a folder runs as a process in test_predict_evaluate_cli.py.
    result = run_in_process("evaluate.py", "--checkpoint", str(best), str(root), "--out-dir", str(tmp_path / "eval"),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if "training images" in line]
    assert warning.startswith(f"warning: 12 of 18 images in {root} were training images")
    assert "--split val" in warning
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["training_images"] == 12

    # Copies count too (same content, other paths), and links to training files; other images do not.
    cfg = run_config(read_metadata(best))
    train_files = [Path(p) for p, _ in audited_splits(cfg.data).train]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "copy.png").write_bytes(train_files[0].read_bytes())
    (elsewhere / "link.png").symlink_to(train_files[1])
    new = make_image_folder(tmp_path / "new", per_class=1, seed=1)
    paths = [elsewhere / "copy.png", elsewhere / "link.png", *sorted(new.rglob("*.png"))]
    assert training_images_among(paths, cfg) == 2


def test_a_checkpoint_with_compiled_key_names_predicts(tmp_path):
    """Written before prefixes were removed on saving: `runtime.compile = true` left `_orig_mod.`."""
    root = make_image_folder(tmp_path / "images", per_class=4)
    torch.manual_seed(0)
    model = build_classifier("tiny_cnn", 3).model
    best = tmp_path / "best.safetensors"
    save_classifier(best, model.state_dict(), ClassifierFacts(
        "tiny_cnn", HeadSpec().to_dict(), sorted(COLORS), Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3), {}),
        metrics={}, epoch=1)
    with safe_open(str(best), "pt") as f:
        metadata = f.metadata()
    old = tmp_path / "compiled.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in load_file(str(best)).items()}, str(old), metadata=metadata)
    out = tmp_path / "preds.csv"
    # In-process: predict.py runs as a process in test_predict_evaluate_cli.py.
    result = run_in_process("predict.py", "--checkpoint", str(old), str(root), "--out", str(out), "--num-workers", "0",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and all(r["class"] in COLORS and not r["error"] for r in rows)
    # The probabilities are the model's own.
    loaded = load_classifier(best)
    first = loaded.preprocessing.load_normalized(rows[0]["path"])
    with torch.no_grad():
        expected = loaded.model(first[None]).softmax(1).max().item()
    assert float(rows[0]["probability"]) == pytest.approx(expected, abs=1e-6)
