"""The audit classifies every kind of bad and odd file, caches by size+mtime, reports and quarantines."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dirty_data import BOMB_LIMIT, EXPECTED, IGNORED_OTHER, IGNORED_SYSTEM, expected_problems, make_dirty_folder
from data.audit import audit_splits, dataset_moments
from data.audit_cache import audit_dir_for
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


def test_an_unchanged_folder_takes_the_last_verdict_without_reading_measurements(dirty, tmp_path):
    cache = tmp_path / "cache"
    first = _audit(dirty, cache)
    moments = dataset_moments(first, [p for p, _ in discover(dirty).train])
    folder = audit_dir_for(dirty, str(cache))
    (folder / "measurements.json").write_text("damaged")  # a verdict hit must not need it
    second = _audit(dirty, cache)
    assert [p.to_dict() for p in second.problems] == [p.to_dict() for p in first.problems]
    assert second.cache_hits == second.files_checked and second.clean_counts == first.clean_counts
    # Statistics still come out right: the measurements are taken again when asked for.
    assert dataset_moments(second, [p for p, _ in discover(dirty).train]) == moments
    # One touched file, or another limit, is a different verdict: audited through the measurements.
    fixed = dirty / "train/cat/truncated.jpg"
    Image.new("RGB", (16, 16), "red").save(fixed, "JPEG")
    third = _audit(dirty, cache)
    assert third.cache_hits == third.files_checked - 1
    assert "train/cat/truncated.jpg" not in {p.relpath for p in third.problems}
    strict = audit_splits(discover(dirty), min_side=4, max_pixels=100, audit_dir=str(cache), progress=False)
    assert {p.problem for p in strict.problems if p.relpath == "train/cat/gray.png"} == {"decompression_bomb"}


# ---- small images are upsampled, degenerate ones left out ----

SIZES = {  # (width, height): left out with the default data.min_image_side = 0
    (1, 1): True, (7, 40): True,  # a side under 8 px: an icon, a tracking pixel
    (2, 500): True, (10, 260): True,  # slivers: one side over 25x the other
    (8, 8): False, (10, 250): False, (25, 25): False, (32, 32): False, (40, 300): False,
}


@pytest.mark.parametrize("min_image_side, also_left_out", [(0, set()), (32, {(25, 25), (8, 8), (10, 250)})])
def test_only_degenerate_images_are_left_out_unless_a_minimum_side_is_set(tmp_path, min_image_side, also_left_out):
    from configs.schema import DataConfig
    from data.audit_training import min_side_for

    for w, h in SIZES:
        folder = tmp_path / "img" / ("a" if w * h % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), "gray").save(folder / f"{w}x{h}.png")
    result = audit_splits(discover(tmp_path / "img"), min_side=min_side_for(DataConfig(min_image_side=min_image_side)),
                          audit_dir=str(tmp_path / "cache"), progress=False, workers=1)
    left_out = {tuple(int(n) for n in Path(p).stem.split("x")) for p in result.left_out}
    assert left_out == {size for size, out in SIZES.items() if out} | also_left_out
    details = {Path(p.path).stem: p.detail for p in result.problems}
    assert details["1x1"] == f"1x1: a side is under {min_side_for(DataConfig(min_image_side=min_image_side))} " \
                             f"pixels ({'degenerate' if not min_image_side else 'data.min_image_side or --min-side'})"
    if not min_image_side:
        assert details["10x260"] == "10x260: a sliver, one side over 25x the other (no crop of it shows anything)"


# ---- class balance when classes are empty ----

@pytest.mark.parametrize("counts, line, ratio", [
    ({"a": 30, "b": 10}, "imbalance (largest / smallest train class): 3.0x  - consider data.sampler=balanced or "
                         "train.class_weights=balanced", 3.0),
    ({"a": 3, "b": 0}, "imbalance: not measured, some train class has no usable images - 1 of 2 (b); training "
                       "refuses an empty class: add images or remove its folder", None),
    ({"a": 0, "b": 0}, "imbalance: not measured, some train class has no usable images - all 2 classes are empty "
                       "after the problems below; fix or replace those files, or check data.root", None),
])
def test_the_imbalance_line_says_what_is_wrong_instead_of_infinity(tmp_path, counts, line, ratio):
    import json

    from data.audit import AuditResult

    result = AuditResult(tmp_path, "class-folders", list(counts), tmp_path)
    result.clean_counts = {"train": counts, "val": dict.fromkeys(counts, 0)}
    assert "         " + line in result.summary_lines()
    assert "inf" not in "\n".join(result.summary_lines())
    report = json.loads(result.write_report(tmp_path / "report.json").read_text(), parse_constant=pytest.fail)
    assert report["imbalance_ratio"] == ratio  # null, never Infinity (not JSON)


@pytest.mark.parametrize("size, min_image_side, hint", [
    ((10, 300), 0, "3 are slivers, one side over 25x the other (crop them to a less extreme shape)"),
    ((25, 25), 32, "3 have a side under 32 pixels (data.min_image_side; 0 keeps every image with a side of 8 or more)"),
    ((4, 4), 0, "3 have a side under 8 pixels (degenerate)"),
])
def test_a_class_the_audit_empties_is_named_with_the_reason(tmp_path, size, min_image_side, hint):
    from configs.errors import UsageError
    from configs.schema import DataConfig
    from data.audit_training import prepare_training_data

    for name, shape in (("a", (40, 40)), ("b", size)):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(4):  # 3 train, 1 validation
            Image.new("RGB", shape, (i * 40, 0, 0)).save(tmp_path / "img" / name / f"{i}.png")
    d = DataConfig(root=str(tmp_path / "img"), audit_dir=str(tmp_path / "cache"), min_image_side=min_image_side)
    with pytest.raises(UsageError, match=r"class 'b' has no usable training images after the audit left out 3 "
                                         r"too_small \(see .*report.json\); " + re.escape(hint) + "$"):
        prepare_training_data(discover(d.root), d, is_main=True, say=lambda line: None)
