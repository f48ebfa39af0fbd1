"""trainer/reporting/plots.py draws every PNG: the LR curve, image grids of mixed sizes (or none), confusion
matrices from any array-like, and nothing is left half-written."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from trainer.reporting import plots


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_every_plot_is_a_png_and_leaves_no_temporary(tmp_path):
    rng = np.random.default_rng(0)
    plots.lr_curve(tmp_path / "lr.png", [1e-5, 1e-4, 1e-3, 1e-2], [2.3, 2.0, 1.1, 3.0], 1e-3)
    # Top losses: files of different sizes, uint8 or float, all framed red, four to a row.
    images = [rng.random((20, 30, 3)), (rng.random((8, 8, 3)) * 255).astype(np.uint8)]
    plots.image_grid(tmp_path / "top.png", images, ["a / b (0.90)", "b / a (0.80)"], [True, True], columns=4)
    plots.image_grid(tmp_path / "none.png", [], [], title="top losses", empty="no mistakes")
    plots.confusion_plot(tmp_path / "cm_list.png", [[3, 1], [0, 2]], ["a", "b"])
    plots.confusion_plot(tmp_path / "cm_tensor.png", torch.tensor([[3, 1], [0, 2]]), ["a", "b"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["cm_list.png", "cm_tensor.png", "lr.png", "none.png", "top.png"]
    assert all(_png_size(tmp_path / n)[0] > 100 for n in names)
    assert (tmp_path / "cm_list.png").read_bytes() == (tmp_path / "cm_tensor.png").read_bytes()
