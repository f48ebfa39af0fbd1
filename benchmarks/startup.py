"""Start-up at scale: seconds from command to the first training step, per data source; and
seconds from command to --help, per launch script.

    python benchmarks/startup.py                        # 100,000 tiny PNGs in /tmp/imgtrain-startup
    python benchmarks/startup.py --files 20000 --repeats 3
    python benchmarks/startup.py --dir /big/disk/startup --sources folder csv
    python benchmarks/startup.py --help-times-only      # only each launch script's --help

Makes (once, kept in --dir) an image folder of tiny PNGs, the same files listed in a labels.csv,
and, when launch/make_shards.py exists, tar shards of them. Each source trains once to warm the
audit cache, then `python launch/train.py` is timed --repeats times, killed right after its first
optimizer step (IMGTRAIN_CRASH_AT=after_step:1). Printed beside them: the floor every run pays,
starting Python and importing the trainer. Target: at most 10 s per source on a 2-core machine.

Before them, `python launch/X.py --help` is timed for every launch script (the median of
--repeats + 1 runs): a script parses its command line before it imports torch, so the answer
should take well under a second (importing torch alone takes seconds).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10


def make_images(root: Path, files: int) -> Path:
    """`files` 16x16 PNGs in CLASSES class folders, and labels.csv beside them; kept between runs."""
    import numpy as np
    from PIL import Image

    done = root / f".complete-{files}"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    rows = []
    for i in range(files):
        name = f"class_{i % CLASSES}"
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name / f"{i:06d}.png")
        rows.append((f"{name}/{i:06d}.png", name))
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label"))
        writer.writerows(rows)
    done.write_text("")
    return root


def source_overrides(source: str, images: Path, shards: Path) -> list[str]:
    if source == "csv":
        return [f"data.root={images}", "data.source=csv", "data.csv=labels.csv"]
    if source == "shards":
        return [f"data.root={shards}", "data.source=shards"]
    return [f"data.root={images}"]


def train_command(overrides: list[str], run_dir: Path) -> list[str]:
    shutil.rmtree(run_dir, ignore_errors=True)  # each start in a new run folder
    return [sys.executable, str(REPO / "launch" / "train.py"), *overrides, f"run.dir={run_dir}",
            "model.name=tiny_cnn", "data.image_size=16", "data.batch_size=32", "data.num_workers=1",
            "train.epochs=1", "runtime.device=cpu", "wandb.mode=disabled"]


def timed(cmd: list[str], env: dict, killed_at_first_step: bool = True) -> float:
    """Seconds from start until the process ends (killed at its first step). Until the process
    ends, not until its output closes: a SIGKILLed trainer's loader workers hold stderr open for
    seconds more (they check every 5 s whether their parent lives), which is no part of a start.
    Its session is killed afterwards, so no orphaned worker runs into the next measurement."""
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                   start_new_session=True)
        code = process.wait()
        seconds = time.perf_counter() - started
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if code != (-9 if killed_at_first_step else 0):  # SIGKILL: the crash point after step 1
            err.seek(0)
            sys.exit(f"{' '.join(cmd[1:3])}... ended with code {code}, not at its first step: "
                     f"{err.read().strip().splitlines()[-1:]}")
    return seconds


def make_shards(images: Path, shards: Path, env: dict) -> bool:
    script = REPO / "launch" / "make_shards.py"
    if not script.is_file():
        return False
    if not (shards / "index.json").is_file():
        config = shards.with_suffix(".toml")
        config.write_text(f'[data]\nroot = "{images}"\n\n[model]\nname = "tiny_cnn"\n')
        subprocess.run([sys.executable, str(script), "--config", str(config), "--out", str(shards)], env=env,
                       check=True, stdout=subprocess.DEVNULL)
    return True


def help_times(repeats: int) -> None:
    """Seconds from `python launch/X.py --help` to its exit, per launch script."""
    print(f"time to --help (median of {repeats} runs)")
    for script in sorted((REPO / "launch").glob("*.py")):
        if script.name in ("cli.py", "_paths.py"):
            continue
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, str(script), "--help"], check=True, stdout=subprocess.DEVNULL)
            runs.append(time.perf_counter() - started)
        print(f"  {script.name + ' --help':<52} {statistics.median(runs):6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default="/tmp/imgtrain-startup")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sources", nargs="+", default=["folder", "csv", "shards"])
    parser.add_argument("--help-times-only", action="store_true", help="time each launch script's --help, no training")
    args = parser.parse_args()
    help_times(args.repeats + 1)
    if args.help_times_only:
        return
    base = Path(args.dir)
    started = time.perf_counter()
    images = make_images(base / f"images-{args.files}", args.files)
    env = dict(os.environ, IMGTRAIN_AUDIT_DIR=str(base / "audit"), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    shards = base / f"shards-{args.files}"
    sources = [s for s in args.sources if s != "shards" or make_shards(images, shards, env)]
    print(f"{args.files:,} files ready in {time.perf_counter() - started:.0f}s ({os.cpu_count()} cores)")
    floor = timed([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import trainer.fit.loop"], env,
                  killed_at_first_step=False)
    print(f"  {'python + import trainer.fit.loop (the floor)':<52} {floor:6.1f} s")
    for source in sources:
        overrides = source_overrides(source, images, shards)
        warm = timed(train_command(overrides, base / f"run-{source}-warm"), dict(env, IMGTRAIN_CRASH_AT="after_step:1"))
        runs = [timed(train_command(overrides, base / f"run-{source}-{i}"), dict(env, IMGTRAIN_CRASH_AT="after_step:1"))
                for i in range(args.repeats)]
        print(f"  {source + ': command to first step, warm audit cache':<52} {statistics.median(runs):6.1f} s "
              f"(runs {', '.join(f'{r:.1f}' for r in runs)}; first run, which warms the caches: {warm:.1f} s)")


if __name__ == "__main__":
    main()
