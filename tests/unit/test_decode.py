"""Decoding only what the model sees: crop plans drawn from the header, JPEGs decoded at reduced
DCT scale, and the pixels that come out compared with full decode + torchvision's resize."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

from data.images import Region, decode_rgb, load_rgb
from data.transforms import CenterCropPlan, Preprocessing, RandomResizedCropPlan, SquashPlan, normalize


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """scikit-learn's two real photos (640x427), saved as JPEGs at 2000x1335 and 320x214."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, array in enumerate(load_sample_images().images):
        for width in (2000, 320):
            image = Image.fromarray(array).resize((width, round(width * 427 / 640)), Image.Resampling.BICUBIC)
            path = folder / f"photo{i}_{width}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return paths


def _reference(path, geometry: list) -> torch.Tensor:
    """The old way: decode every pixel, then torchvision's tensor ops."""
    return v2.Compose(geometry)(load_rgb(path))


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_eval_decode_stays_within_two_grey_levels_of_full_decode(photos, crop_mode):
    pre = Preprocessing(224, 0.875, (0.5,) * 3, (0.25,) * 3, crop_mode)
    geometry = ([v2.Resize(256, antialias=True), v2.CenterCrop(224)] if crop_mode == "center"
                else [v2.Resize((224, 224), antialias=True)])
    for path in photos:
        fast = pre.eval_transform().load(path).float()
        slow = _reference(path, geometry).float()
        assert fast.shape == slow.shape == (3, 224, 224)
        assert (fast - slow).abs().mean() <= 2.0, path.name  # the bound; measured: at most 1.4


def test_large_jpegs_are_decoded_at_reduced_scale(photos, monkeypatch):
    scales = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        scales.append(self.size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decode_rgb(photos[0], plan=CenterCropPlan(224, 0.875))  # short side 256, twice over: 1/2 of 1335 covers it
    decode_rgb(photos[0], plan=RandomResizedCropPlan(64))  # a training crop decodes at the fastest scale
    assert scales[0] == (1000, 667) and scales[1][0] < 1000


def test_random_resized_crop_plan_draws_like_torchvision_and_replays():
    """Boxes inside the image, with torchvision's area and aspect ranges (or its fallback center
    crop), the same box again from the same seed."""
    plan = RandomResizedCropPlan(64, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    for seed in range(200):
        random.seed(seed)
        (left, top, right, bottom), size, _ = plan(300, 200)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200 and size == (64, 64)
        assert 0.2 * 60000 * 0.95 <= w * h <= 0.9 * 60000 * 1.05 and 0.45 <= w / h <= 2.2
        random.seed(seed)
        assert plan(300, 200).box == (left, top, right, bottom)
    random.seed(0)  # no crop of a 1000x10 sliver has an aspect ratio in range: the widest that does
    assert plan(1000, 10).box == (490, 0, 510, 10)


def test_random_resized_crop_at_decode_matches_crop_then_resize(photos):
    """The same box through the reduced decoder and through full decode + F.resized_crop."""
    plan = RandomResizedCropPlan(160, scale=(0.3, 1.0))
    for seed in range(3):
        random.seed(seed)
        fast = torch.from_numpy(decode_rgb(photos[0], plan=plan)).permute(2, 0, 1).float()
        random.seed(seed)
        box = (left, top, right, bottom) = plan(*Image.open(photos[0]).size).box
        slow = v2.functional.resized_crop(load_rgb(photos[0]), top, left, bottom - top, right - left, [160, 160],
                                          antialias=True).float()
        # Training crops decode at the fastest DCT scale (no oversampling): measured 1.7-3.4, a
        # softer low-pass than antialiased resizing, far below what augmentation changes.
        assert (fast - slow).abs().mean() <= 4.0
        # Decoded at a larger scale the same box agrees to a few hundredths: the box is where it should be.
        sharp = decode_rgb(photos[0], plan=lambda w, h: Region(box, (160, 160), 4.0))
        assert (torch.from_numpy(sharp).permute(2, 0, 1).float() - slow).abs().mean() <= 0.1


def test_non_jpeg_and_rotated_images_take_the_full_decode(tmp_path):
    """PNG, EXIF-rotated JPEG and CMYK JPEG: decoded whole, then the planned crop (and the EXIF
    rotation comes first, so the plan sees the upright size)."""
    array = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    Image.fromarray(array).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rotated = Image.fromarray(array)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display: upright it is 40 wide, 60 high
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    sizes = []
    plan = SquashPlan(16)

    def recording(width, height):
        sizes.append((width, height))
        return plan(width, height)

    for name in ("a.png", "cmyk.jpg", "rotated.jpg"):
        assert decode_rgb(tmp_path / name, plan=recording).shape == (16, 16, 3)
    assert sizes == [(60, 40), (60, 40), (40, 60)]
    whole = decode_rgb(tmp_path / "a.png")
    assert (decode_rgb(tmp_path / "a.png", plan=lambda w, h: Region((0, 0, w, h), (w, h))) == whole).all()


def test_normalize_matches_float_division():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalize(images, mean, std), expected, atol=1e-5)
    assert normalize(images, mean, std, channels_last=True).is_contiguous(memory_format=torch.channels_last)
