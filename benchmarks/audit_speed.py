"""Audit speed: files per second on a cold cache vs a warm one (unchanged folder), side by side.

    python benchmarks/audit_speed.py                      # 2,000 synthetic 256x256 JPEGs in a temp folder
    python benchmarks/audit_speed.py --files 10000 --size 384 --workers 8
    python benchmarks/audit_speed.py --root datasets/pets  # an existing folder (its cache goes to a temp dir)

Prints files/second for: one process cold, all cores cold, and cached; and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.audit import audit_splits  # noqa: E402
from data.folders import discover  # noqa: E402


def make_folder(root: Path, files: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(files):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth-ish photographs compress like real ones; noise would make JPEGs unrealistically big.
        shifted = np.roll(base, i, axis=(0, 1)) // 2 + rng.integers(0, 128, (1, 1, 3), dtype=np.uint8)
        Image.fromarray(shifted).resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="an existing image folder (default: make a synthetic one)")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="0: every core")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_folder(Path(tmp) / "images", args.files, args.size)
        splits = discover(root)
        workers = args.workers or os.cpu_count()
        rows = []
        for label, kw in (("cold, 1 process", dict(workers=1, use_cache=True, audit_dir=f"{tmp}/c1")),
                          (f"cold, {workers} processes", dict(workers=workers, audit_dir=f"{tmp}/c2")),
                          ("cached (unchanged folder)", dict(workers=workers, audit_dir=f"{tmp}/c2"))):
            result = audit_splits(splits, progress=False, **kw)
            rows.append((label, result.files_checked, result.seconds, result.cache_hits))
        print(f"audit speed on {root} ({rows[0][1]} files, {os.cpu_count()} cores)")
        for label, n, seconds, hits in rows:
            print(f"  {label:<28} {n / seconds:>10,.0f} files/s  ({seconds:.2f}s, {hits} cache hits)")
        print(f"  parallel speedup  {rows[0][2] / rows[1][2]:.1f}x")
        print(f"  cache speedup     {rows[1][2] / rows[2][2]:.1f}x (cold all-core time / cached time)")


if __name__ == "__main__":
    main()
