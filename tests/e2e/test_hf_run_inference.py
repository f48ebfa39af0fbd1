"""evaluate.py and predict.py on a checkpoint trained (in-process, one tiny epoch) from a saved
Hugging Face dataset whose images live in the dataset, so training read them from the cache
outside data.root: its own --split val and --split test, the dataset itself (--hf), and a plain
labelled folder of the same pictures. Training images are found by content wherever they are
stored, and predict warns about them in the same words as evaluate."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import make_image_folder, reset_accelerate_state, run_in_process
from trainer.files.model_file import read_metadata

CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """24 images as the dataset's train split (18 train / 6 val after the split), 6 others as its test split."""
    datasets = pytest.importorskip("datasets")
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    root = tmp_path_factory.mktemp("hf_run")
    images = make_image_folder(root / "images", per_class=8)
    held_out = make_image_folder(root / "held_out", per_class=2, seed=1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    parts = {}
    for split, folder in (("train", images), ("test", held_out)):
        files = sorted(folder.rglob("*.png"))
        parts[split] = datasets.Dataset.from_dict({"image": [str(p) for p in files],
                                                   "label": [CLASSES.index(p.parent.name) for p in files]},
                                                  features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root / "saved"))  # the images' bytes go into the dataset
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IMGTRAIN_HF_DIR", str(root / "hf-cache"))
        reset_accelerate_state()
        cfg = load_config(None, [f"data.root={root / 'saved'}", "data.source=hf", f"run.dir={root / 'run'}",
                                 "model.name=tiny_cnn", "data.image_size=16", "data.batch_size=4", "train.epochs=1",
                                 "data.val_fraction=0.25", "optim.lr=0.01", "data.num_workers=0",
                                 "runtime.device=cpu", "train.precision=no", "wandb.mode=disabled"])
        train(cfg)
        reset_accelerate_state()
    return root / "run" / "best.safetensors", root


@pytest.fixture(autouse=True)
def _the_runs_cache(hf_run, monkeypatch):
    monkeypatch.setenv("IMGTRAIN_HF_DIR", str(hf_run[1] / "hf-cache"))


def _evaluate(best, tmp_path, *args):
    result = run_in_process("evaluate.py", "--checkpoint", str(best), *args, "--out-dir", str(tmp_path / "ev"),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result, json.loads((tmp_path / "ev" / "metrics.json").read_text())


def _warning(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if "training images" in line]
    return line


def test_the_runs_own_splits(hf_run, tmp_path):
    best, root = hf_run
    recorded = read_metadata(best)["metrics"]
    result, report = _evaluate(best, tmp_path, "--split", "val")
    assert report["images"] == recorded["val_images"] == 6 and report["accuracy"] == recorded["val_acc"]
    assert report["source"] == f"the validation split of {(root / 'saved').resolve()}"
    assert "training images" not in result.stderr
    result, report = _evaluate(best, tmp_path, "--split", "test")
    assert report["images"] == 6 and report["source"] == f"the 'test' split of {(root / 'saved').resolve()}"


def test_the_dataset_and_a_folder_of_the_same_pictures(hf_run, tmp_path):
    best, root = hf_run
    # The dataset's train split: the same cached files training read (18 of its 24 rows trained).
    result, report = _evaluate(best, tmp_path, "--hf", str(root / "saved"), "--hf-split", "train")
    assert report["images"] == 24 and report["training_images"] == 18
    assert _warning(result.stderr).startswith(f"warning: 18 of 24 images in {report['source']} were training images")
    # Its test split: other pictures.
    result, report = _evaluate(best, tmp_path, "--hf", str(root / "saved"))
    assert report["images"] == 6 and report["training_images"] == 0 and "training images" not in result.stderr
    # The pictures the dataset was made from, as a labelled folder: copies of the cached training files.
    result, report = _evaluate(best, tmp_path, str(root / "images"))
    assert report["images"] == 24 and report["training_images"] == 18
    evaluated = _warning(result.stderr)
    assert evaluated.endswith("so this accuracy is not a held-out score; use --split val for the run's own "
                              "validation split")

    out = tmp_path / "preds.csv"
    result = run_in_process("predict.py", "--checkpoint", str(best), str(root / "images"), "--out", str(out),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader(out.open()))) == 24
    predicted = _warning(result.stderr)
    # One function words both: the same count, images and folder, then what it means for each.
    shared = f"warning: 18 of 24 images in {root / 'images'} were training images of this checkpoint (same file " \
             f"or same content), "
    assert evaluated.startswith(shared) and predicted.startswith(shared)
    assert predicted.endswith("so their predictions say little about images it has not seen")
    result = run_in_process("predict.py", "--checkpoint", str(best), str(root / "held_out"), "--out", str(out),
                            "--num-workers", "0", cwd=tmp_path)
    assert result.returncode == 0 and "training images" not in result.stderr
