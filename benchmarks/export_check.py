"""Which backbones export to ONNX, how long it takes, and how close onnxruntime stays to PyTorch.

    python benchmarks/export_check.py                                   # a spread of timm and torchvision models
    python benchmarks/export_check.py timm/resnet50 timm/vit_small_patch16_224 --image-size 224

Builds each model with a 10-class head (random weights: nothing is downloaded), exports it as
launch/export.py does (trainer.export.onnx_file: dynamic batch, opset 18) and runs the same check on
8 random inputs: max |logit difference| against PyTorch and top-1 agreement, in one batch and in
a batch of one. A model that does not export prints the one line export.py would print.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from configs.errors import ProjectError  # noqa: E402
from models import build_classifier  # noqa: E402
from trainer.export.onnx_file import check_onnx, export_onnx  # noqa: E402

DEFAULT = ["timm/resnet50", "timm/efficientnet_b0", "timm/vit_small_patch16_224", "timm/convnext_tiny",
           "timm/regnety_016", "timm/swin_tiny_patch4_window7_224", "timm/mobilenetv3_large_100",
           "torchvision/resnet18", "torchvision/efficientnet_b0", "torchvision/vit_b_16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=DEFAULT)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models:
        model = build_classifier(name, 10).model.eval()
        images = torch.randn(8, 3, args.image_size, args.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            try:
                export_onnx(model, args.image_size, Path(tmp) / "model.onnx", {}, name)
                check = check_onnx(Path(tmp) / "model.onnx", model, images)
                print(f"{name}: {time.perf_counter() - started:.1f}s, {check.summary()}", flush=True)
            except ProjectError as e:
                print(f"{name}: {e}", flush=True)


if __name__ == "__main__":
    main()
