"""GPU JPEG decode (data.decode = "cuda"), its logic checked on the CPU device (torchvision's
decode_jpeg runs on both) and on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from data.device_decode import DeviceDecode, EncodedTransform, collate_encoded
from data.sampling import seeded_call
from data.transforms import train_transform


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list:
    """Two real photos as JPEGs, a grayscale JPEG, a PNG and an EXIF-rotated JPEG."""
    folder = tmp_path_factory.mktemp("mixed")
    photos = load_sample_images().images
    paths = []
    for i, array in enumerate(photos):
        paths.append(folder / f"photo{i}.jpg")
        Image.fromarray(array).resize((480, 320)).save(paths[-1], quality=90)
    paths.append(folder / "gray.jpg")
    Image.fromarray(photos[0]).convert("L").resize((300, 200)).save(paths[-1], quality=90)
    paths.append(folder / "flat.png")
    Image.fromarray(photos[1]).resize((200, 150)).save(paths[-1])
    rotated = Image.fromarray(photos[0]).resize((240, 160))
    exif = rotated.getexif()
    exif[0x0112] = 6
    paths.append(folder / "rotated.jpg")
    rotated.save(paths[-1], exif=exif, quality=90)
    return paths


def _batches(paths, device, seeds):
    """The same samples through the CPU path and the device path, each sample under its seed."""
    transform, _ = train_transform("standard", 64)
    encoder, decode = EncodedTransform(transform.plan), DeviceDecode(transform.ops, device)
    cpu = torch.stack([seeded_call(s, transform.load, p) for s, p in zip(seeds, paths)])
    encoded = [seeded_call(s, encoder.load, p) for s, p in zip(seeds, paths)]
    batch, _ = collate_encoded([(e, 0) for e in encoded])
    return cpu, decode(batch), encoded


def _check_device_path(files, device):
    seeds = list(range(11, 11 + len(files)))
    cpu, on_device, encoded = _batches(files, device, seeds)
    assert on_device.shape == cpu.shape == (len(files), 3, 64, 64) and on_device.dtype == torch.uint8
    assert on_device.device.type == torch.device(device).type
    # JPEGs nvjpeg can take go as bytes; the PNG and the EXIF-rotated one are decoded by the worker.
    assert [e.data is not None for e in encoded] == [True, True, True, False, False]
    # The same crop, flip and colours: only the decoders' and resizers' rounding differ.
    difference = (on_device.cpu().float() - cpu.float()).abs().mean(dim=(1, 2, 3))
    assert (difference <= 4.0).all(), difference
    # A replayed batch is bit-for-bit the same.
    again = _batches(files, device, seeds)[1]
    assert torch.equal(again, on_device)


def test_device_decode_on_the_cpu_device_matches_the_cpu_path(files):
    _check_device_path(files, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_decode_on_cuda_matches_the_cpu_path(files):
    _check_device_path(files, "cuda")


def test_a_broken_jpeg_is_reported_and_replaced_by_its_neighbour(files):
    transform, _ = train_transform("standard", 32)
    failures = []
    encoder = EncodedTransform(transform.plan)
    decode = DeviceDecode([], "cpu", lambda path, error: failures.append(path))
    good, bad = encoder.load(files[0]), encoder.load(files[1])
    bad.data = bad.data[: len(bad.data) // 3].clone()  # truncated: no decoder can finish it
    batch, _ = collate_encoded([(good, 0), (bad, 1)])
    out = decode(batch)
    assert out.shape == (2, 3, 32, 32) and torch.equal(out[0], out[1])
    assert failures == [str(files[1])]
    batch, _ = collate_encoded([(bad, 1)])
    with pytest.raises(RuntimeError, match=r"no file of a training batch could be decoded .*audit\.py"):
        decode(batch)


def test_a_run_built_for_device_decode_gives_the_cpu_paths_batches(files, tmp_path, monkeypatch):
    """The whole wiring (dataset of encoded JPEGs, seeded collate, decode in the batch finish),
    with the device decode on the CPU device: the same first batch as the CPU path, within rounding."""
    import trainer.assemble.run_parts as build
    from trainer.assemble.accelerator import make_accelerator
    from trainer.assemble.run_config import load_config

    root = tmp_path / "data"
    for i, path in enumerate(files * 4):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}{path.suffix}").write_bytes(path.read_bytes())
    overrides = [f"data.root={root}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn", "data.image_size=32",
                 "data.batch_size=8", "data.num_workers=0", "runtime.device=cpu", "data.audit=off"]
    first = {}
    for where in ("cpu", "cuda"):
        monkeypatch.setattr(build, "decode_on", lambda cfg, accelerator: where)
        cfg = load_config(None, overrides)
        parts = build.build_run(cfg, make_accelerator(cfg))
        parts.train_loader.start_epoch(1)
        first[where] = next(iter(parts.train_loader))
    (cpu_images, cpu_labels), (device_images, device_labels) = first["cpu"], first["cuda"]
    assert torch.equal(cpu_labels, device_labels)
    assert (device_images - cpu_images).abs().mean() < 0.1  # normalized units: about 4 grey levels


def test_cuda_decode_without_cuda_is_refused_naming_the_key(tmp_path):
    from configs.errors import ConfigError
    from trainer.assemble.run_config import load_config
    from trainer.assemble.accelerator import decode_on, make_accelerator

    cfg = load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", "data.decode=cuda",
                                "runtime.device=cpu"])
    with pytest.raises(ConfigError, match='data.decode = "cuda" needs a CUDA device.*data.decode=cpu'):
        decode_on(cfg, make_accelerator(cfg))
