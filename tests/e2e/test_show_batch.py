"""show_batch.py as a subprocess: the augmented-batch grid."""

from __future__ import annotations

from PIL import Image

from helpers import run_script


def test_show_batch_writes_a_grid_png(image_folder, tmp_path):
    out = tmp_path / "grid.png"
    result = run_script("show_batch.py", "--out", str(out), "--count", "6",
                        f"data.root={image_folder}", "model.name=tiny_cnn", "data.image_size=16",
                        "data.augment=square", f"data.audit_dir={tmp_path / 'audit'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as grid:
        assert grid.format == "PNG" and min(grid.size) >= 100
    assert f"wrote {out}" in result.stdout
