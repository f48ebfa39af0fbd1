"""The demo digits trained from every data source, with 1 and 2 processes: the same accuracy?

    python benchmarks/sources_accuracy.py                       # folder, csv, hf, shards x 1, 2 processes
    python benchmarks/sources_accuracy.py --sources folder csv --processes 2 --epochs 3

Writes the digits once (launch/prepare_demo.py) as a folder, lists them in a labels.csv, saves
them as a Hugging Face dataset (save_to_disk, images embedded) and, when launch/make_shards.py
exists, as tar shards; then trains configs/demo.toml from each through `accelerate launch` (CPU,
gloo for 2 processes) and prints each run's final and best val_acc beside the folder's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def prepare(base: Path, env: dict) -> dict[str, list[str]]:
    """{source: the data.* overrides that train from it}."""
    digits = base / "digits"
    if not (digits / ".complete").exists():
        subprocess.run([sys.executable, str(REPO / "launch" / "prepare_demo.py"), str(digits)], check=True, env=env)
    files = sorted(p for p in digits.rglob("*.png"))
    with open(base / "digits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label"))
        writer.writerows((p.relative_to(digits).as_posix(), p.parent.name) for p in files)
    sources = {"folder": [f"data.root={digits}"],
               "csv": [f"data.root={digits}", "data.source=csv", f"data.csv={base / 'digits.csv'}"]}
    try:
        import datasets

        saved = base / "digits-hf"
        if not saved.exists():
            names = sorted({p.parent.name for p in files})
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            datasets.Dataset.from_dict({"image": [str(p) for p in files],
                                        "label": [names.index(p.parent.name) for p in files]},
                                       features=features).save_to_disk(str(saved))
        sources["hf"] = [f"data.root={saved}", "data.source=hf"]
    except ImportError:
        print("datasets is not installed: no hf row (pip install -e '.[hf]')")
    shards = base / "digits-shards"
    if (REPO / "launch" / "make_shards.py").is_file():
        if not (shards / "index.json").is_file():
            subprocess.run([sys.executable, str(REPO / "launch" / "make_shards.py"), "--config",
                            str(REPO / "configs" / "demo.toml"), f"data.root={digits}", "--out", str(shards)],
                           check=True, env=env)
        sources["shards"] = [f"data.root={shards}", "data.source=shards"]
    return sources


def train(overrides: list[str], processes: int, run_dir: Path, epochs: int, env: dict) -> list[dict]:
    flags = ["--num_processes", "1"]
    if processes == 2:
        flags = ["--multi_gpu", "--num_machines", "1", "--num_processes", "2"]
    cmd = [ACCELERATE, "launch", "-q", *flags, "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "demo.toml"), *overrides,
           f"run.dir={run_dir}", f"train.epochs={epochs}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(overrides)} with {processes} process(es) failed: {done.stderr.strip()[-800:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/imgtrain-sources")
    parser.add_argument("--sources", nargs="+", default=["folder", "csv", "hf", "shards"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=0, help="0: the demo config's")
    args = parser.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", IMGTRAIN_AUDIT_DIR=str(base / "audit"),
               IMGTRAIN_HF_DIR=str(base / "hf-cache"))
    sources = prepare(base, env)
    epochs = args.epochs or tomllib.loads((REPO / "configs" / "demo.toml").read_text())["train"]["epochs"]
    print(f"{'source':<8} {'processes':>9} {'final val_acc':>14} {'best val_acc':>13} {'vs folder':>10}")
    folder_acc: dict[int, float] = {}
    for processes in args.processes:
        for source in [s for s in args.sources if s in sources]:
            history = train(sources[source], processes, base / f"run-{source}-{processes}", epochs, env)
            final, best = history[-1]["val_acc"], max(r["val_acc"] for r in history)
            if source == "folder":
                folder_acc[processes] = final
            delta = f"{100 * (final - folder_acc[processes]):+.1f} pt" if processes in folder_acc else ""
            print(f"{source:<8} {processes:>9} {final:>14.4f} {best:>13.4f} {delta:>10}", flush=True)


if __name__ == "__main__":
    main()
