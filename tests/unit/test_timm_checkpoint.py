"""A saved timm checkpoint loads with plain timm."""

import pytest
import torch

from models import HeadSpec, build_classifier
from trainer.model_file import save_classifier


def test_timm_checkpoint_loads_with_plain_timm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    built = build_classifier("timm/test_resnet", 3)
    path = tmp_path / "best.safetensors"
    save_classifier(path, built.model.state_dict(), model_name="timm/test_resnet", head=HeadSpec().to_dict(),
                    class_names=["a", "b", "c"], mean=built.mean, std=built.std, image_size=32, crop_pct=1.0,
                    config={}, metrics={}, epoch=1)
    # file= is a local path: no network. num_classes in the overlay keeps timm from dropping our head.
    plain = timm.create_model("test_resnet", num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    x = torch.rand(2, 3, 32, 32)
    built.model.eval(), plain.eval()
    assert torch.equal(built.model(x), plain(x))
