"""Write a config's dataset as WebDataset-style tar shards plus index.json, then train from them.

    # the audited train and val samples of C.toml's source, in shards of about 256 MB
    python launch/make_shards.py --config configs/demo.toml --out datasets/digits-shards
    # smaller shards, any config key overridden as for training (the source, its split, the audit)
    python launch/make_shards.py --config configs/regnet.toml data.root=/data/buildings --out /data/buildings-shards \\
        --shard-size 64MB
    # train from them: one process, several GPUs, several machines (as launch/train.py)
    python launch/train.py --config configs/demo.toml data.source=shards data.root=datasets/digits-shards
    accelerate launch --multi_gpu --num_machines 1 --num_processes 4 --mixed_precision no --dynamo_backend no \\
        launch/train.py --config configs/regnet.toml data.source=shards data.root=/data/buildings-shards \\
        data.shuffle_buffer=2000

Each sample is `KEY.jpg` (or .png, ...: the file's own bytes, not re-encoded) and `KEY.cls` (its
class index). index.json records the class names, the training split's mean/std, each shard's
samples, size and sha256, and a digest over every source file's relative path, size and sha256.
The folder appears whole or not at all; an existing non-empty --out is refused. Bad input ends in
one `error:` line, exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse

from cli import config_parser, output_folder, parse_config_args, run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--out", required=True, help="the new shards folder (must not exist, or be empty)")
    parser.add_argument("--shard-size", default="256MB",
                        help="target size of each tar (default 256MB; units B, KB, MB, GB, KiB, MiB, GiB)")
    return parse_config_args(parser, argv)


def main() -> int:
    from pathlib import Path

    from configs.errors import UsageError
    from trainer.assemble.run_config import load_config

    args = parse_args()
    output_folder(args.out, "--out")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty: choose a new folder")
    cfg = load_config(args.config, args.overrides)
    from data.audit_training import source_stats
    from data.shards import parse_size, write_shards
    from data.sources import open_source

    target = parse_size(args.shard_size)
    source = open_source(cfg.data)
    source.check_shardable()
    if cfg.data.task == "multilabel":
        raise UsageError("shards hold one class index per sample, so multi-label rows cannot be written to them; "
                         "train multi-label runs from the CSV source (data.source = csv)")
    splits = source.audited()
    mean, std = source_stats(cfg.data, splits)
    made_from = {"source": cfg.data.source, "root": str(Path(cfg.data.root).expanduser().resolve()),
                 "audit": cfg.data.audit, "val_fraction": cfg.data.val_fraction, "seed": cfg.data.seed}
    write_shards(splits, out, target, (mean, std), made_from, seed=cfg.data.seed)
    print(f"train from them: python launch/train.py --config {args.config or 'C.toml'} data.source=shards "
          f"data.root={out}")
    return 0


if __name__ == "__main__":
    run_main(main)
