"""Named augmentations, presets, batch mixing and the augmented-batch grid."""

from __future__ import annotations

import pytest
import torch

from data.transforms import (PRESETS, MixingCollate, PadToSquare, Preprocessing, batch_mixer, crop_mode_of, parse_op,
                             train_transform)
from configs.errors import UsageError


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gives_normalized_square_float_images(preset):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    out = train_transform(preset, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), extra_ops=["random_erasing(p=1.0)"])(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3, crop_mode_of(preset)).eval_transform()(image).shape == (3, 16, 16)


def test_pad_to_square_centres_the_image():
    image = torch.full((3, 4, 10), 200, dtype=torch.uint8)
    padded = PadToSquare()(image)
    assert padded.shape == (3, 10, 10)
    assert (padded[:, 3:7] == 200).all() and (padded[:, :3] == 0).all() and (padded[:, 7:] == 0).all()


@pytest.mark.parametrize("spec, parsed", [
    ("hflip", ("hflip", {})),
    ("color_jitter(brightness=0.2, hue=0.05)", ("color_jitter", {"brightness": 0.2, "hue": 0.05})),
    ("random_affine(degrees=10, shear=(0, 45))", ("random_affine", {"degrees": 10, "shear": (0, 45)})),
])
def test_op_specs_parse(spec, parsed):
    assert parse_op(spec) == parsed


@pytest.mark.parametrize("spec, message", [
    ("colour_jitter", "did you mean 'color_jitter'"),
    ("color_jitter(0.2)", "key=value"),
    ("color_jitter(brightness=x)", "key=value"),
    ("hflip(", "must look like name or name(key=value, ...)"),
])
def test_bad_op_specs_say_what_would_work(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_op(spec)


def test_mixup_and_cutmix_make_soft_labels():
    collate = MixingCollate(batch_mixer(3, mixup_alpha=0.4, cutmix_alpha=1.0))
    images, labels = collate([(torch.rand(3, 8, 8), i % 3) for i in range(6)])
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 3)
    assert torch.allclose(labels.sum(1), torch.ones(6))
    assert batch_mixer(3, 0.0, 0.0) is None
