"""Write a grid PNG of augmented training samples: see what the model sees before training on it.

    # the config's training pipeline (preset, extra ops, normalization undone for display)
    python launch/show_batch.py --config configs/demo.toml --out batch.png
    # try an augmentation without editing the config
    python launch/show_batch.py --config configs/demo.toml --out batch.png --count 32 \\
        data.augment=square 'data.augment_ops=["random_erasing(p=0.5)"]'
    # MixUp / CutMix as the loss sees them (labels show the two strongest classes)
    python launch/show_batch.py --config configs/demo.toml --out mixed.png data.cutmix_alpha=1.0

The samples are the trainer's first batches (trainer/assemble/run_parts.py): files the audit leaves out are left
out here too (data.audit=off shows the folder as it is).
"""

from __future__ import annotations

import argparse

from cli import config_parser, output_file, parse_config_args, run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--out", default="batch.png", help="PNG file to write (default batch.png; a name without an "
                                                           "extension gets .png)")
    parser.add_argument("--count", type=int, default=16, help="how many samples (default 16)")
    return parse_config_args(parser, argv)


def main() -> int:
    from configs.errors import UsageError
    from trainer.assemble.run_config import load_config

    args = parse_args()
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    out, note = output_file(args.out, "--out", (".png",))
    cfg = load_config(args.config, args.overrides)
    from data.folders import data_root

    data_root(cfg.data)  # a mistyped data.root answers now, not after the training imports
    from trainer.fit.diagnostics import batch_grid

    path = batch_grid(cfg, out, args.count)
    print(f"wrote {path}")
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    run_main(main)
