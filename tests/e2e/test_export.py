"""launch/export.py on checkpoints of real tiny trainings: ONNX through onnxruntime and the Hub
folder through plain timm give the same predictions as our checkpoint; bad input writes nothing."""

import json

import numpy as np
import pytest
import torch

from helpers import reset_accelerate_state, run_in_process, run_script
from trainer.files.model_file import load_classifier

onnxruntime = pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")


def _train(images, run_dir, *overrides):
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    reset_accelerate_state()
    cfg = load_config(None, [f"data.root={images}", f"run.dir={run_dir}", "data.num_workers=0", "train.epochs=1",
                             "runtime.device=cpu", "data.batch_size=8", *overrides])
    train(cfg)
    reset_accelerate_state()
    return run_dir / "best.safetensors"


@pytest.fixture(scope="module")
def timm_run(images, tmp_path_factory):
    # data.augment=stretch: eval squashes, a crop mode timm's config must carry over.
    return _train(images, tmp_path_factory.mktemp("timm_run"), "model.name=timm/test_resnet",
                  "data.image_size=32", "data.augment=stretch", "optim.lr=0.01")


@pytest.fixture(scope="module")
def ours_run(images, tmp_path_factory):
    return _train(images, tmp_path_factory.mktemp("ours_run"), "model.name=tiny_cnn", "data.image_size=16")


def _val_images(loaded, images):
    paths = sorted((images / "val").rglob("*.png"))
    return paths, torch.stack([loaded.preprocessing.load_normalized(str(p)) for p in paths])


def test_timm_checkpoint_exports_both_and_round_trips(timm_run, images, tmp_path):
    out = tmp_path / "export"
    result = run_script("export.py", "--checkpoint", str(timm_run), "--format", "both", "--out", str(out),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.safetensors", "config.json", "README.md",
                                               "export.json"}
    assert "onnxruntime matches PyTorch on 15 images" in result.stdout
    loaded = load_classifier(timm_run)
    _, x = _val_images(loaded, images)
    with torch.no_grad():
        ours = loaded.model(x)

    # ONNX: every validation image, a batch size it was not exported with, same answers.
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    assert np.abs(got - ours.numpy()).max() <= 1e-4
    assert (got.argmax(1) == ours.numpy().argmax(1)).all()
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == loaded.class_names
    assert json.loads(meta["preprocessing"])["crop_mode"] == "squash"

    # Hub folder: plain timm rebuilds the same model, with its labels and preprocessing.
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), ours, atol=1e-6)
    cfg = plain.pretrained_cfg
    assert cfg["label_names"] == loaded.class_names and plain.num_classes == len(loaded.class_names)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_mode"] == "squash" and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == pytest.approx(loaded.preprocessing.mean)
    data_cfg = timm.data.resolve_data_config({}, model=plain)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_mode"] == "squash"

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card
    for name in loaded.class_names:
        assert f"| {name} | 16 | 5 |" in card  # class counts: 16 train, 5 val
    assert "| class | precision | recall | F1 | images |" in card and "ONNX check:" in card
    record = json.loads((out / "export.json").read_text())
    assert record["epoch"] == loaded.metadata["epoch"] and len(record["sha256"]) == 64


def test_our_model_exports_onnx_and_hub_is_refused_in_one_line(ours_run, images, tmp_path):
    out = tmp_path / "onnx"
    # In-process: export.py runs as a process on the timm checkpoint above.
    result = run_in_process("export.py", "--checkpoint", str(ours_run), "--format", "onnx", "--out", str(out),
                            "--images", str(images / "val" / "red"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch on 5 images" in result.stdout
    assert {p.name for p in out.iterdir()} == {"model.onnx", "README.md", "export.json"}

    refused = run_in_process("export.py", "--checkpoint", str(ours_run), "--format", "both",
                             "--out", str(tmp_path / "hub"), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --format hub writes timm's model folder, and tiny_cnn is not a timm backbone; use --format onnx "
        "(or train a timm/<name> backbone)"]
    assert not (tmp_path / "hub").exists()


def test_export_without_the_runs_images_checks_random_inputs_and_says_so(ours_run, images, tmp_path):
    # The data moved away: the export still works, says what it checked on, the card says what is missing.
    moved = tmp_path / "gone"
    result = run_in_process("export.py", "--checkpoint", str(ours_run), "--format", "onnx", "--out", str(moved),
                            "--data-root", str(images), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Measured at export on the validation split" in (moved / "README.md").read_text()
    meta = load_classifier(ours_run).metadata
    meta["config"]["data"]["root"] = str(tmp_path / "nowhere")
    from safetensors.torch import load_file, save_file
    copy = tmp_path / "moved.safetensors"
    raw = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)) for k, v in meta.items()}
    save_file(load_file(str(ours_run)), str(copy), metadata=raw)
    out = tmp_path / "random"
    result = run_in_process("export.py", "--checkpoint", str(copy), "--format", "onnx", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "checked on random inputs" in result.stderr
    assert "Per-class results: not measured" in (out / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--out", "{existing}"], "already exists and is not an empty folder"),
    (["--format", "onnx", "--out", "{new}", "--images", "{missing}"], "not a file or folder"),
    (["--format", "onnx", "--out", "{new}", "--push", "me/repo"], "--push uploads the Hub-format folder"),
    (["--format", "tflite", "--out", "{new}"], "argument --format: invalid choice"),
    (["--format", "onnx", "--out", "{new}", "--data-root", "{missing}"], "is not a folder here"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ours_run, tmp_path, args, message):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    paths = {"existing": existing, "new": tmp_path / "new", "missing": tmp_path / "missing"}
    result = run_in_process("export.py", "--checkpoint", str(ours_run), *[a.format(**paths) for a in args],
                            cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "new").exists() and [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".*tmp-*"))


def test_push_offline_fails_in_one_line_and_keeps_the_complete_folder(timm_run, images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hub"
    result = run_in_process("export.py", "--checkpoint", str(timm_run), "--format", "hub", "--out", str(out),
                            "--push", "someone/tiny-model", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not push to someone/tiny-model: "
                                                             "HF_HUB_OFFLINE is set; the export in ")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md", "export.json"}
    assert "hf-hub:someone/tiny-model" in (out / "README.md").read_text()


def test_multilabel_checkpoint_exports_its_task_and_thresholds(tmp_path):
    from helpers import MULTILABEL, make_multilabel_folder

    data = make_multilabel_folder(tmp_path / "data", count=48)
    ckpt = _train(data, tmp_path / "run", *MULTILABEL, "model.name=timm/test_resnet", "data.image_size=32",
                  "train.best_metric=val_loss")
    out = tmp_path / "export"
    result = run_in_process("export.py", "--checkpoint", str(ckpt), "--format", "both", "--out", str(out),
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = load_classifier(ckpt).metadata
    config = json.loads((out / "config.json").read_text())
    assert config["imgtrain"] == {"task": "multilabel", "thresholds": meta["thresholds"]}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_meta = session.get_modelmeta().custom_metadata_map
    assert onnx_meta["task"] == "multilabel" and json.loads(onnx_meta["thresholds"]) == meta["thresholds"]
    card = (out / "README.md").read_text()
    assert "mAP " in card and "| class | precision | recall | F1 | ap | threshold | images |" in card
    assert ".sigmoid()" in card
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert plain.pretrained_cfg["label_names"] == ["blue", "green", "red"]
