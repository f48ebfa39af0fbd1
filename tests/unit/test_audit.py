"""The audit classifies every kind of bad and odd file, caches by size+mtime, reports and quarantines."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dirty_data import BOMB_LIMIT, EXPECTED, IGNORED_OTHER, IGNORED_SYSTEM, expected_problems, make_dirty_folder
from data.audit import audit_splits
from data.folders import discover
from data.images import decode_rgb


@pytest.fixture
def dirty(tmp_path) -> Path:
    return make_dirty_folder(tmp_path / "dirty")


def _audit(root: Path, cache: Path, **kw):
    return audit_splits(discover(root), min_side=4, max_pixels=BOMB_LIMIT, audit_dir=str(cache), progress=False, **kw)


def test_every_file_is_classified_as_expected(dirty, tmp_path):
    result = _audit(dirty, tmp_path / "cache")
    got = {p.relpath: p.problem for p in result.problems}
    assert got == expected_problems()
    left_out = {Path(p).relative_to(dirty).as_posix() for p in result.left_out}
    assert left_out == {rel for rel, kind in expected_problems().items() if kind != "leakage"}
    assert result.ignored_system == len(IGNORED_SYSTEM)
    assert result.ignored_other == len(IGNORED_OTHER)
    # Every odd-but-valid file was decoded and counted; the files checked are exactly the candidates.
    assert result.files_checked == len(list((dirty / "train").rglob("*.*"))) + len(list((dirty / "val").rglob("*.*"))) \
        - len([r for r in IGNORED_SYSTEM + IGNORED_OTHER if r.startswith(("train", "val"))])
    details = {p.relpath: p.detail for p in result.problems}
    assert "HTML" in details["train/cat/error_page.jpg"]
    assert "data.max_image_pixels" in details["train/dog/bomb.png"]
    assert "train/cat/dup_a.png" in details["train/cat/dup_b.png"]
    assert result.clean_counts["train"]["cat"] == 10 + 5  # clean images + dup_a + four valid oddities
    assert result.imbalance_ratio() == pytest.approx(max(result.clean_counts["train"].values())
                                                     / min(result.clean_counts["train"].values()))


def test_valid_oddities_decode_to_rgb(dirty):
    for rel, kind in EXPECTED.items():
        if kind is None:
            array = decode_rgb(str(dirty / rel))
            assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, rel
    # EXIF orientation 6 turns the stored 24x16 (w x h) into 16 wide, 24 high.
    assert decode_rgb(str(dirty / "train/dog/exif_rotated.jpg")).shape == (24, 16, 3)
    # 16-bit values are scaled, not clipped to white.
    gray16 = np.asarray(Image.open(dirty / "train/dog/gray16.png"), dtype=np.float64)
    decoded = decode_rgb(str(dirty / "train/dog/gray16.png"))[..., 0]
    assert abs(decoded.mean() - gray16.mean() / 65535 * 255) < 1.0
    # Transparent palette pixels (index 2) become white.
    palette = np.asarray(Image.open(dirty / "train/cat/palette_transparent.png"))
    assert (decode_rgb(str(dirty / "train/cat/palette_transparent.png"))[palette == 2] == 255).all()


def test_cache_is_reused_and_changed_files_are_measured_again(dirty, tmp_path):
    cache = tmp_path / "cache"
    first = _audit(dirty, cache, workers=2)
    assert first.cache_hits == 0
    second = _audit(dirty, cache)
    assert second.cache_hits == second.files_checked
    assert [p.to_dict() for p in second.problems] == [p.to_dict() for p in first.problems]
    # A repaired file (new bytes, new mtime) is decoded again and passes.
    fixed = dirty / "train/cat/truncated.jpg"
    Image.new("RGB", (16, 16), "red").save(fixed, "JPEG")
    os.utime(fixed, ns=(1, 1))
    third = _audit(dirty, cache)
    assert third.cache_hits == third.files_checked - 1
    assert "train/cat/truncated.jpg" not in {p.relpath for p in third.problems}
    # A lower pixel limit is applied to cached sizes without decoding again.
    strict = audit_splits(discover(dirty), min_side=4, max_pixels=100, audit_dir=str(cache), progress=False)
    assert strict.cache_hits == strict.files_checked  # sizes are cached: nothing decoded again
    assert {p.problem for p in strict.problems if p.relpath == "train/cat/gray.png"} == {"decompression_bomb"}
