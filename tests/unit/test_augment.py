"""Named augmentations, presets, batch mixing and the augmented-batch grid."""

from __future__ import annotations

import pytest
import torch

from PIL import Image

from configs.errors import UsageError
from data.transforms import (PRESETS, BatchFinish, PadToSquare, Preprocessing, batch_mixer, crop_mode_of, parse_op,
                             train_transform)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gives_uint8_square_images_that_finish_normalized(preset, tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).numpy()).save(path)
    transform, after = train_transform(preset, 16, extra_ops=["random_erasing(p=1.0)"])
    image = transform.load(path)
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8  # workers hand on uint8
    assert len(after) == 1  # random erasing works on normalized images: on the device
    finish = BatchFinish((0.5,) * 3, (0.25,) * 3, after)
    images, labels = finish(image[None], torch.tensor([0]))
    assert images.dtype == torch.float32 and (images == 0).any()  # normalized, then erased
    eval_image = Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3, crop_mode_of(preset)).eval_transform().load(path)
    assert eval_image.shape == (3, 16, 16) and eval_image.dtype == torch.uint8


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
    finish = BatchFinish((0.5,) * 3, (0.25,) * 3, mixer=batch_mixer(3, mixup_alpha=0.4, cutmix_alpha=1.0))
    images, labels = finish(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 3)
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 3)
    assert torch.allclose(labels.sum(1), torch.ones(6))
    assert batch_mixer(3, 0.0, 0.0) is None


def test_random_erasing_on_the_device_draws_what_torchvision_draws():
    from torchvision.transforms import v2

    from data.transforms import erase_on_device

    for value in (0, "random"):
        op = v2.RandomErasing(p=0.7, value=value)
        for seed in range(10):
            image = torch.randn(3, 16, 16)
            torch.manual_seed(seed)
            expected = op(image.clone())
            torch.manual_seed(seed)
            assert torch.equal(erase_on_device(op, image.clone()), expected)


def test_transforms_describe_themselves_the_same_in_every_process():
    """The feature cache keys on the eval transform's repr: an object address would miss every time."""
    pre = Preprocessing(16, 0.875, (0.5,) * 3, (0.25,) * 3)
    assert repr(pre.eval_transform()) == repr(pre.eval_transform())
    assert " at 0x" not in repr(train_transform("standard", 16)[0])
