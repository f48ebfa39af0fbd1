"""A saved timm checkpoint loads with plain timm."""

import pytest
import torch

from models import HeadSpec, build_classifier
from data.transforms import Preprocessing
from trainer.files.model_file import ClassifierFacts, save_classifier


def test_timm_checkpoint_loads_with_plain_timm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    built = build_classifier("timm/test_resnet", 3)
    path = tmp_path / "best.safetensors"
    facts = ClassifierFacts("timm/test_resnet", HeadSpec().to_dict(), ["a", "b", "c"],
                            Preprocessing(32, 1.0, tuple(built.mean), tuple(built.std)), {})
    save_classifier(path, built.model.state_dict(), facts, metrics={}, epoch=1)
    # file= is a local path: no network. num_classes in the overlay keeps timm from dropping our head.
    plain = timm.create_model("test_resnet", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    x = torch.rand(2, 3, 32, 32)
    built.model.eval(), plain.eval()
    assert torch.equal(built.model(x), plain(x))
