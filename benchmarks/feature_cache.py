"""Epoch time with and without cached backbone features, side by side in one run.

    python benchmarks/feature_cache.py                       # torchvision/resnet18 at 112 px, CPU
    python benchmarks/feature_cache.py --model timm/resnet50 --image-size 224 --images 400

Trains the same frozen-backbone run three ways (uncached; cached from a cold cache; cached again
with the cache warm) on a synthetic image folder and prints the per-epoch times and the number of
epochs after which caching has paid for its first, feature-computing epoch.
"""

from __future__ import annotations

import argparse
import math
import time
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="torchvision/resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=240, help="images in all (3 classes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from helpers import make_image_folder
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_image_folder(tmp / "images", per_class=args.images // 3, size=args.image_size)

        def run(name: str, cached: bool) -> tuple[list[float], float]:
            """Epoch times, and the time spent before the first epoch (model, data, feature extraction)."""
            cfg = load_config(None, [
                f"data.root={root}", f"run.dir={tmp / name}", f"model.name={args.model}", "model.freeze=backbone",
                f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.num_workers=2",
                "data.augment=none", f"train.epochs={args.epochs}", "train.precision=no",
                f"train.cache_features={str(cached).lower()}", f"train.feature_cache_dir={tmp / 'cache'}"])
            started = time.perf_counter()
            epochs = [h["epoch_time"] for h in train(cfg).history]
            return epochs, time.perf_counter() - started - sum(epochs)

        plain, plain_setup = run("plain", False)
        cold, cold_setup = run("cold", True)
        warm, warm_setup = run("warm", True)
    # The cold cached run computes features before its first epoch: charge that to epoch 1.
    extraction = max(0.0, cold_setup - plain_setup)
    cold[0] += extraction

    print(f"\n{args.model}, {args.images} images at {args.image_size} px, batch {args.batch_size}")
    print(f"{'epoch':>5}  {'uncached':>9}  {'cached (cold)':>13}  {'cached (warm)':>13}")
    for i, (a, b, c) in enumerate(zip(plain, cold, warm), 1):
        print(f"{i:>5}  {a:>8.2f}s  {b:>12.2f}s  {c:>12.2f}s")
    print(f"feature extraction (cold cache) {extraction:.2f}s, included in cached epoch 1; "
          f"setup with a warm cache {warm_setup - plain_setup:+.2f}s vs uncached")
    uncached = sum(plain) / len(plain)
    later = sum(cold[1:]) / max(1, len(cold) - 1)
    extra = cold[0] - uncached  # what the feature-computing first epoch costs beyond a normal one
    saving = uncached - later
    print(f"mean uncached epoch {uncached:.2f}s; cached epochs after the first {later:.3f}s "
          f"({uncached / max(later, 1e-9):.0f}x faster)")
    if saving <= 0:
        print("break-even: never (cached epochs are not faster here)")
    else:
        epochs = 1 if extra <= 0 else 1 + math.ceil(extra / saving)
        print(f"first cached epoch {cold[0]:.2f}s vs {uncached:.2f}s uncached: break-even after {epochs} epoch(s)")


if __name__ == "__main__":
    main()
