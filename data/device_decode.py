"""JPEG decoding on the GPU (`data.decode = "cuda"`), for when the CPU cores cannot decode as fast
as the model trains (resnet18 on an H100 wants ~12,000 images/s; 16 cores decode a few thousand).

Split between the workers and the device:
  workers  read the file's bytes and its header, draw the training crop from the header's size
           (the same seeded draw as the CPU path) and a seed for the ops after it; files nvjpeg
           cannot take as they are (not a baseline/progressive RGB or gray JPEG, EXIF-rotated,
           CMYK) are decoded on the CPU right there, already cropped and resized
  device   one batched `torchvision.io.decode_jpeg(..., device="cuda")` call, then per image the
           crop and resize and the remaining training ops (flip, jitter, ...) with torch's RNG
           seeded from the image's own seed, so a replayed batch is bit-for-bit the same

Validation stays on the CPU path (its center crop decodes at reduced DCT scale there already).
"""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from data.transforms import apply_ops, draw_op_seed
from data.images import DEFAULT_MAX_PIXELS, DecompressionBomb, Region, decode_rgb, orientation_of, scalable_jpeg


@dataclass
class EncodedImage:
    """One training sample as a worker hands it on: JPEG bytes and a box, or finished pixels."""

    path: str
    op_seed: int  # seeds torch's RNG for the ops after the crop, on the device
    region: Region | None = None
    data: torch.Tensor | None = None  # the file's bytes (uint8, 1-D) when the device decodes it
    pixels: torch.Tensor | None = None  # (3, H, W) uint8 when the worker decoded it


@dataclass
class EncodedBatch:
    """What the collate makes of EncodedImages: lists, since byte strings differ in length.
    Pinning and `send_to_device` leave it alone (no `.to`/`.pin_memory`): nvjpeg reads host bytes."""

    images: list[EncodedImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


class EncodedTransform:
    """The worker side of a training transform whose JPEGs the device decodes: `load` gives an
    EncodedImage (data.dataset.ImageListDataset calls it like ImageTransform.load)."""

    def __init__(self, plan):
        self.plan = plan

    def load(self, path, max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
        return read_encoded(str(path), self.plan, max_pixels)

    def __repr__(self) -> str:
        return f"EncodedTransform(plan={self.plan!r})"


def read_encoded(path: str, plan, max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
    """A worker's part: the crop drawn from the header (Python's RNG, seeded per sample), the op
    seed drawn from torch's (seeded per sample too), and the bytes or the CPU-decoded pixels."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if max_pixels and width * height > max_pixels:
            raise DecompressionBomb(width, height, max_pixels)
        on_device = scalable_jpeg(image) and orientation_of(image) == 1
    if on_device:
        region = plan(width, height) if plan is not None else None
        return EncodedImage(path, draw_op_seed(), region, data=torch.frombuffer(bytearray(data), dtype=torch.uint8))
    # The same draws as the CPU path makes for this file, in the same order.
    pixels = torch.from_numpy(decode_rgb(io.BytesIO(data), max_pixels, plan)).permute(2, 0, 1).contiguous()
    return EncodedImage(path, draw_op_seed(), pixels=pixels)


def collate_encoded(samples) -> tuple[EncodedBatch, torch.Tensor]:
    encoded, labels = zip(*samples)
    # Class indices, or multi-hot vectors (multi-label) stacked.
    targets = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)
    return EncodedBatch(list(encoded)), targets


class DeviceDecode:
    """EncodedBatch -> (N, 3, S, S) uint8 on `device`: batched nvjpeg decode, then per image the
    crop, the resize and the training ops (data.transforms' tensor ops, on the device).

    A file no decoder can read (changed since the audit, or the audit was off) is reported through
    `record_failure(path, error)` (data.dataset.ImageListDataset's failure log) and replaced by its
    neighbour in the batch, as the CPU path replaces it by the next readable sample."""

    def __init__(self, ops: list, device, record_failure=None):
        self.ops, self.device = list(ops), torch.device(device)
        self.record_failure = record_failure

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        jpegs = [e for e in batch.images if e.data is not None]
        decoded = iter(self._decode(jpegs))
        out: list[torch.Tensor | None] = []
        for e in batch.images:
            image = next(decoded) if e.data is not None else e.pixels.to(self.device, non_blocking=True)
            if image is not None and e.data is not None:
                image = self._crop(image, e.region)
            out.append(image if image is None or not self.ops else apply_ops(image, self.ops, e.op_seed))
        return torch.stack(_fill_gaps(out, batch))

    def _crop(self, image: torch.Tensor, region: Region | None) -> torch.Tensor:
        if image.shape[0] == 1:  # grayscale JPEG
            image = image.expand(3, -1, -1)
        if region is None:
            return image
        (left, top, right, bottom), (width, height) = region.box, region.size
        return F.resized_crop(image, round(top), round(left), round(bottom - top), round(right - left),
                              [height, width], antialias=True)

    def _decode(self, jpegs: list[EncodedImage]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec
            try:
                return decode_jpeg([e.data for e in jpegs], mode=ImageReadMode.UNCHANGED, device=self.device)
            except RuntimeError:
                pass  # one bad file fails the whole batched call: decode one by one to find it
            return [self._decode_one(e, decode_jpeg, ImageReadMode.UNCHANGED) for e in jpegs]

    def _decode_one(self, e: EncodedImage, decode_jpeg, mode) -> torch.Tensor | None:
        try:
            return decode_jpeg(e.data, mode=mode, device=self.device)
        except RuntimeError:
            pass
        try:  # PIL reads some files nvjpeg refuses (and says what is wrong with the others)
            pixels = decode_rgb(io.BytesIO(e.data.numpy().tobytes()))
            return torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)
        except Exception as error:  # any decode failure: PIL raises many types
            if self.record_failure is not None:
                self.record_failure(e.path, error)
            else:
                print(f"warning: skipped {e.path}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return None


def _fill_gaps(images: list, batch: EncodedBatch) -> list[torch.Tensor]:
    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise RuntimeError(f"no file of a training batch could be decoded (first: {batch.images[0].path}); "
                           "run `python launch/audit.py DATA_ROOT` to find what is wrong with the data")
    return [image if image is not None else images[min(good, key=lambda g: (abs(g - i), g))]
            for i, image in enumerate(images)]
