"""The parts of export: the ONNX check catches a graph that computes something else, a model with
an operator ONNX lacks is refused naming it (and nothing is written), timm's data config expresses
each crop mode, and the export folder appears whole or not at all."""

import numpy as np
import pytest
import torch
from torch import nn

from configs.errors import UsageError
from data.files import atomic_folder
from data.transforms import Preprocessing
from models import HeadSpec, build_classifier
from models.registry import MODELS
from trainer.export.export_run import ExportRequest, export_checkpoint
from trainer.export.hub_folder import hub_refusal, timm_data_config
from trainer.files.model_file import ClassifierFacts, save_classifier
from trainer.export.onnx_file import ExportMismatch, check_onnx, export_onnx, read_onnx_metadata

pytest.importorskip("onnxruntime")


class CummaxNet(nn.Module):
    """A classifier whose forward uses torch.cummax, which the ONNX converter cannot translate."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.cummax(self.conv(x), dim=3).values
        return self.fc(x.mean((2, 3)))


if "test_cummax_net" not in MODELS:
    MODELS.register("test_cummax_net")(CummaxNet)


def _checkpoint(tmp_path, name: str):
    torch.manual_seed(0)
    built = build_classifier(name, 3)
    path = tmp_path / f"{name}.safetensors"
    facts = ClassifierFacts(name, HeadSpec().to_dict(), ["a", "b", "c"],
                            Preprocessing(16, 1.0, tuple(built.mean), tuple(built.std)), config={})
    save_classifier(path, built.model.state_dict(), facts, metrics={"val_acc": 0.5}, epoch=1)
    return path


def test_an_operator_without_onnx_translation_is_named_and_nothing_is_written(tmp_path):
    ckpt = _checkpoint(tmp_path, "test_cummax_net")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"test_cummax_net does not export to ONNX: no ONNX translation of the "
                                         r"operator aten\.cummax"):
        export_checkpoint(ExportRequest(str(ckpt), str(out), "onnx"))
    assert not out.exists() and not list(tmp_path.glob(".*tmp-*"))


def test_the_check_catches_a_graph_that_differs_from_the_model(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("tiny_cnn", 3).model.eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, 16, path, {"class_names": '["a", "b", "c"]'}, "tiny_cnn")
    assert read_onnx_metadata(path) == {"class_names": '["a", "b", "c"]'}
    images = torch.randn(4, 3, 16, 16)
    check = check_onnx(path, model, images)
    assert check.images == 4 and check.max_abs_diff <= 1e-4 and check.batch_sizes == (4, 1)
    with torch.no_grad():
        model.fc.bias += 1e-3  # what the file computes is now 1e-3 away from the model
    with pytest.raises(ExportMismatch, match="disagrees with the PyTorch model"):
        check_onnx(path, model, images)


@pytest.mark.parametrize("mode, size, crop_pct, timm_crop_pct, note", [
    ("center", 224, 0.875, 0.875, ""),  # 224 / 0.875 = 256 exactly
    ("center", 32, 0.9, 0.9, "one pixel more"),  # 35.6: we round to 36, timm floors to 35
    ("squash", 64, 0.875, 1.0, ""),  # ours squashes the whole image: timm's squash at 1.0
    ("border", 64, 0.875, 1.0, "padded with black"),
])
def test_timm_data_config_expresses_each_crop_mode(mode, size, crop_pct, timm_crop_pct, note):
    config, notes = timm_data_config(Preprocessing(size, crop_pct, (0.5,) * 3, (0.25,) * 3, mode))
    assert config == {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": timm_crop_pct,
                      "crop_mode": mode, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    assert (note in " ".join(notes)) if note else notes == []


@pytest.mark.parametrize("name, head, refused", [
    ("timm/resnet18", {"kind": "linear"}, None),
    ("timm/resnet18", {"kind": "mlp"}, "model.head='mlp'"),
    ("torchvision/resnet18", {"kind": "linear"}, "torchvision/resnet18 is not a timm backbone"),
    ("simple_cnn", {"kind": "linear"}, "simple_cnn is not a timm backbone"),
])
def test_only_timm_backbones_with_a_linear_head_have_a_hub_form(name, head, refused):
    answer = hub_refusal(name, head)
    assert (answer is None) if refused is None else (refused in answer and "use --format onnx" in answer)


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as folder:
            (folder / "a.txt").write_text("half")
            raise RuntimeError("failed midway")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty folder may be filled
    with atomic_folder(target) as folder:
        (folder / "a.txt").write_text("whole")
    assert (target / "a.txt").read_text() == "whole"
    with pytest.raises(OSError):  # a folder with something in it is never replaced
        with atomic_folder(target) as folder:
            (folder / "b.txt").write_text("other")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("mode", ["center", "squash"])
def test_timms_transform_from_the_exported_config_sees_the_pixels_validation_saw(tmp_path, mode):
    timm = pytest.importorskip("timm")
    from PIL import Image, ImageFilter

    yy, xx = np.mgrid[0:375, 0:500]  # a smooth non-square photo: resampling filters agree on it
    pixels = np.stack([xx / 500 * 255, yy / 375 * 255, (xx + yy) % 97 / 97 * 255], -1).astype(np.uint8)
    Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(3)).save(tmp_path / "photo.jpg", quality=95)
    p = Preprocessing(224, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), mode)
    config, _ = timm_data_config(p)
    theirs = timm.data.create_transform(**config)(Image.open(tmp_path / "photo.jpg").convert("RGB"))
    ours = p.load_normalized(str(tmp_path / "photo.jpg"))
    grey_levels = ((theirs - ours) * torch.tensor(p.std).view(3, 1, 1) * 255).abs()
    assert theirs.shape == ours.shape and grey_levels.mean() < 0.1  # measured: 0.002 center, 0.0 squash


@pytest.mark.parametrize("data, says", [
    ({"source": "folder", "root": "/d"}, "An image folder (`data.root` = `/d`); validation: its own val/ folder."),
    ({"source": "csv", "root": "/d", "csv": "labels.csv", "csv_split_column": "fold"},
     "Images listed in a CSV (`data.csv` = `labels.csv`, paths under `data.root` = `/d`); validation: the rows its "
     "`fold` column marks val."),
    ({"source": "hf", "root": "/d", "val_fraction": 0.2, "seed": 0},
     "A Hugging Face dataset on disk (`data.root` = `/d`); validation: its validation split, or else 0.2 of each "
     "class (stratified, seed 0)."),
    ({"source": "shards", "root": "/d"}, "Tar shards written by launch/make_shards.py (`data.root` = `/d`); "
                                         "validation: its val shards."),
])
def test_the_card_names_the_source_the_run_read(data, says):
    from trainer.export.model_card import CardFacts, model_card

    card = model_card(CardFacts("tiny_cnn", ["a", "b"], "best.safetensors", 1, {}, {"data": data},
                                {"image_size": 16, "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear",
                                 "mean": [0.5] * 3, "std": [0.5] * 3}, data_layout="split-folders"))
    assert says in card
