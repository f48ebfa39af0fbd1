"""Training throughput, side by side in one run: the compute ceiling, this project's input pipeline
and trainer, and timm's loader on the same photos and settings; plus the CPU cost per sample of
decode + training transform, ours against timm's, at three photo sizes.

    python benchmarks/throughput.py                                   # CPU defaults: a few minutes on 2 cores
    python benchmarks/throughput.py --model timm/resnet50 --batch 256 --image-size 224 \
        --precision bf16 --images 12800 --workers 15                  # one H100, the issue's setting
    python benchmarks/throughput.py --model timm/resnet18 --decode cuda  # JPEGs decoded by nvjpeg (data.decode)
    python benchmarks/throughput.py --skip-trainer --skip-timm        # ceiling and pipeline only

The photos are scikit-learn's two sample photographs (real JPEG content), cropped, flipped and
resized to --photo-size, written as JPEGs (quality 90) into a class folder tree in a temp dir.
Without scikit-learn, two generated stand-ins (smooth colour fields with grain) take their place,
said in the first line: their JPEGs cost a little more to decode than the photos'.
--json FILE also writes the settings and rows as JSON (benchmarks/gpu_check.py reads it).

Rows, images/second (and each as a ratio to the ceiling):
  compute ceiling   forward + backward + optimizer step on one batch already on the device
  our pipeline      data.sampling.TrainBatches alone: batches normalized on the device, no model
  timm loader       timm.data.create_loader alone (its CUDA prefetcher where there is CUDA)
  our trainer       `launch/train.py` on the folder, steady state: the last epoch's images/s
  timm loader+step  timm's loader feeding the same training step (what timm's train.py does)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SIZES = ((320, 240), (1024, 768), (4000, 3000))


# ---- photos ----


@functools.lru_cache(maxsize=1)
def sample_photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return generated_photos()
    return list(load_sample_images().images)


def photo_source() -> str:
    return "scikit-learn's sample photos" if importlib.util.find_spec("sklearn") else "generated photos (no scikit-learn)"


def generated_photos() -> list[np.ndarray]:
    """Two 640x427 stand-ins for scikit-learn's sample photos: smooth colour fields with grain."""
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(2):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((640, 427), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, field.shape, dtype=np.int16)
        photos.append(np.clip(field + grain, 0, 255).astype(np.uint8))
    return photos


def write_photo(array: np.ndarray, size: tuple[int, int], path: Path, variant: int) -> None:
    """A different real-looking photo per variant: a shifted crop of 80-100% of the source, maybe mirrored."""
    h, w = array.shape[:2]
    rng = np.random.default_rng(variant)
    frac = rng.uniform(0.8, 1.0)
    ch, cw = int(h * frac), int(w * frac)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = Image.fromarray(array[top:top + ch, left:left + cw])
    if variant % 2:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)


def make_folder(root: Path, count: int, size: tuple[int, int], classes: int = 4) -> Path:
    photos = sample_photos()
    jobs = []
    for split, n in (("train", count), ("val", max(classes, count // 8))):
        for i in range(n):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((photos[i % len(photos)], size, folder / f"{i:06d}.jpg", i))
    # PIL resizes and encodes without the GIL: threads write the 12800 photos of a GPU run in seconds.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: write_photo(*job), jobs))
    return root


# ---- CPU cost per sample ----


def per_sample_ms(load, paths: list[Path], repeats: int) -> float:
    load(paths[0])  # warm caches and lazy imports
    started = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            load(path)
    return (time.perf_counter() - started) * 1000 / (repeats * len(paths))


def cpu_cost_table(image_size: int, tmp: Path) -> list[tuple[str, float, float]]:
    """(photo size, our ms/sample, timm's ms/sample): one thread, decode + training transform."""
    from timm.data import create_transform

    from data.transforms import train_transform

    torch.set_num_threads(1)
    ours, _ = train_transform("standard", image_size)
    # timm's training transform with the same augmentation (random resized crop + flip, no color
    # jitter) and its prefetcher form (uint8 out, normalization on the device), as ours.
    timm_tf = create_transform(image_size, is_training=True, color_jitter=None, use_prefetcher=True)
    rows = []
    for width, height in SIZES:
        folder = tmp / f"cost_{width}x{height}"
        folder.mkdir()
        paths = []
        for i in range(4):
            paths.append(folder / f"{i}.jpg")
            write_photo(sample_photos()[i % 2], (width, height), paths[-1], i)
        repeats = max(1, 40_000_000 // (width * height * len(paths)))
        torch.manual_seed(0)
        mine = per_sample_ms(ours.load, paths, repeats)
        torch.manual_seed(0)
        theirs = per_sample_ms(lambda p: timm_tf(Image.open(p).convert("RGB")), paths, repeats)
        rows.append((f"{width}x{height}", mine, theirs))
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


# ---- throughput ----


def build_model(name: str, classes: int, device: torch.device, channels_last: bool):
    from models import HeadSpec, build_classifier

    model = build_classifier(name, classes, HeadSpec(), False, "").model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_step(model, device: torch.device, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = torch.nn.CrossEntropyLoss()

    def step(images, labels):
        with autocast(device, precision):
            loss = criterion(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(batches, count: int, warmup: int, batch: int, device: torch.device, consume=None) -> float:
    """Images/second over `count` batches after `warmup` batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        images, labels = next(iterator)[:2]
        if consume:
            consume(images, labels)
    sync(device)
    started = time.perf_counter()
    for _ in range(count):
        images, labels = next(iterator)[:2]
        if consume:
            consume(images, labels)
    sync(device)
    return count * batch / (time.perf_counter() - started)


def endless(loader):
    while True:
        yield from loader


def ceiling(args, device: torch.device, channels_last: bool) -> float:
    model = build_model(args.model, 4, device, channels_last).train()
    step = make_step(model, device, args.precision)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (args.batch,), device=device)
    return rate(iter(lambda: (images, labels), None), args.steps, args.warmup, args.batch, device, step)


def our_pipeline(args, folder: Path, device: torch.device, channels_last: bool):
    from accelerate import Accelerator

    from configs.schema import IMAGENET_MEAN, IMAGENET_STD
    from data import ImageListDataset, discover
    from data.dataset import Loading
    from data.sampling import TrainBatches
    from data.transforms import BatchFinish, train_transform

    accelerator = Accelerator(cpu=device.type == "cpu")
    splits = discover(str(folder), 0.2, 0)
    transform, after = train_transform("standard", args.image_size)
    dataset, loading, decode = ImageListDataset(splits.train, transform), Loading(args.workers, device.type == "cuda", 4), None
    if args.decode == "cuda":  # as trainer.assemble.run_parts wires data.decode = "cuda"
        from data.device_decode import DeviceDecode, EncodedTransform, collate_encoded

        dataset = ImageListDataset(splits.train, EncodedTransform(transform.plan))
        loading = Loading(args.workers, True, 4, collate_encoded)
        decode = DeviceDecode(transform.ops, device)
    finish = BatchFinish(IMAGENET_MEAN, IMAGENET_STD, after, None, channels_last, decode)
    batches = TrainBatches(dataset, args.batch, loading, 0, accelerator, finish=finish)
    return batches


def timm_loader(args, folder: Path, device: torch.device):
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(folder / "train"), split="train", is_training=True)
    return create_loader(dataset, (3, args.image_size, args.image_size), args.batch, is_training=True,
                         color_jitter=None, num_workers=args.workers, pin_memory=device.type == "cuda",
                         device=device, use_prefetcher=device.type == "cuda", persistent_workers=True,
                         img_dtype=torch.float32)


def our_trainer(args, folder: Path, tmp: Path) -> float:
    """Steady-state images/s of `launch/train.py` (the last epoch: worker start-up and first-step
    compilation land in the first)."""
    run_dir = tmp / "run"
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.toml"),
               f"data.root={folder}", f"model.name={args.model}", "model.pretrained=false",
               f"data.image_size={args.image_size}", f"data.batch_size={args.batch}", "data.augment=standard",
               f"data.num_workers={args.workers}", f"train.precision={args.precision}",
               f"train.epochs={args.trainer_epochs}", "data.audit=off", f"run.dir={run_dir}", "wandb.mode=disabled",
               "optim.name=adamw", "optim.lr=1e-4", f"data.decode={args.decode}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    wait = last.get("data_wait_seconds")
    if wait is not None:
        print(f"  our trainer, last epoch: {last['images_per_sec']:.1f} img/s, waited for data "
              f"{wait:.1f} s of {last['train_seconds']:.1f} s", flush=True)
    return last["images_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="timm/resnet50" if cuda else "timm/resnet18")
    parser.add_argument("--batch", type=int, default=256 if cuda else 32)
    parser.add_argument("--image-size", type=int, default=224 if cuda else 128)
    parser.add_argument("--precision", default="bf16" if cuda else "no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--images", type=int, default=12800 if cuda else 512)
    parser.add_argument("--photo-size", default="500x375", help="WxH of the training photos")
    parser.add_argument("--steps", type=int, default=30 if cuda else 6, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=10 if cuda else 2)
    parser.add_argument("--trainer-epochs", type=int, default=2)
    parser.add_argument("--decode", default="cpu", choices=("cpu", "cuda"), help="data.decode for our rows")
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--skip-timm", action="store_true")
    parser.add_argument("--skip-cost", action="store_true", help="skip the CPU ms/sample table")
    parser.add_argument("--cost-size", type=int, default=224, help="output side in the ms/sample table")
    parser.add_argument("--json", type=Path, help="also write the settings and rows to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    channels_last = cuda
    if cuda:
        torch.backends.cudnn.benchmark = True
    width, height = (int(v) for v in args.photo_size.split("x"))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"device {device} ({torch.cuda.get_device_name() if cuda else f'{os.cpu_count()} cores'}), "
              f"{args.model}, batch {args.batch}, {args.image_size} px, precision {args.precision}, "
              f"{args.workers} workers, {args.images} {photo_source()} at {width}x{height}, decode on {args.decode}",
              flush=True)
        if not args.skip_cost:
            print(f"\nCPU ms per training sample (decode + random resized crop to {args.cost_size} + flip, one thread):")
            print(f"  {'photo':>10} {'ours':>8} {'timm':>8} {'ours/timm':>10}")
            for size, mine, theirs in cpu_cost_table(args.cost_size, tmp):
                print(f"  {size:>10} {mine:8.2f} {theirs:8.2f} {mine / theirs:10.2f}", flush=True)

        folder = make_folder(tmp / "photos", args.images, (width, height))
        rows = [("compute ceiling", ceiling(args, device, channels_last))]
        batches = our_pipeline(args, folder, device, channels_last)
        rows.append(("our pipeline", rate(endless(batches), args.steps, args.warmup, args.batch, device)))
        if not args.skip_timm:
            rows.append(("timm loader", rate(endless(timm_loader(args, folder, device)), args.steps, args.warmup,
                                             args.batch, device)))
        if not args.skip_trainer:
            rows.append(("our trainer", our_trainer(args, folder, tmp)))
        if not args.skip_timm:
            model = build_model(args.model, 4, device, channels_last).train()
            rows.append(("timm loader+step", rate(endless(timm_loader(args, folder, device)), args.steps,
                                                  args.warmup, args.batch, device,
                                                  make_step(model, device, args.precision))))
        top = rows[0][1]
        print(f"\n  {'':<18} {'img/s':>9} {'x ceiling':>10}")
        for name, value in rows:
            print(f"  {name:<18} {value:9.1f} {value / top:10.2f}", flush=True)
        if args.json:
            settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            args.json.write_text(json.dumps({
                "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                "channels_last": channels_last, "photos": photo_source(), "settings": settings,
                "rows": [{"name": name, "images_per_sec": value, "x_ceiling": value / top} for name, value in rows],
            }, indent=1) + "\n")


if __name__ == "__main__":
    main()
