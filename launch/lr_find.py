"""Learning-rate finder: an exponential sweep of the learning rate over a few hundred steps.

    python launch/lr_find.py --config configs/demo.toml
    python launch/lr_find.py --config configs/regnet.toml data.root=/path --start 1e-7 --end 1 --steps 200
    # on a GPU, in the precision training will use
    python launch/lr_find.py --config configs/regnet.toml data.root=/path runtime.device=cuda train.precision=bf16

It trains on exactly what training would see (same split, audit, normalization, augmentation and
batches: trainer/assemble/run_parts.py). Every parameter group is scaled by the same factor, so each group's
ratio to the head (optim.backbone_lr_mult, optim.layer_decay) is kept. Writes the loss-vs-lr plot (--out,
default lr_find.png; .svg and .pdf too; a name without an extension gets .png) and prints a suggestion
for optim.lr: the steepest descent of the smoothed loss.
"""

from __future__ import annotations

import argparse

from cli import config_parser, output_file, parse_config_args, run_main

PLOT_KINDS = (".png", ".svg", ".pdf")


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--start", type=float, default=1e-7)
    parser.add_argument("--end", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="lr_find.png", help="the plot: a .png (default lr_find.png), .svg or .pdf "
                                                              "file")
    return parse_config_args(parser, argv)


def main() -> int:
    from configs.errors import UsageError
    from trainer.assemble.run_config import load_config

    args = parse_args()
    if not (0 < args.start < args.end) or args.steps < 3:
        raise UsageError("need 0 < --start < --end and --steps >= 3")
    out, note = output_file(args.out, "--out", PLOT_KINDS)
    cfg = load_config(args.config, args.overrides)
    from data.folders import data_root

    data_root(cfg.data)  # a mistyped data.root answers now, not after the training imports
    from trainer.fit.diagnostics import lr_sweep, plot_lr_sweep

    sweep = lr_sweep(cfg, args.start, args.end, args.steps)
    plot_lr_sweep(sweep, out)
    print(f"swept {len(sweep.lrs)} steps from {sweep.lrs[0]:.1e} to {sweep.lrs[-1]:.1e}; plot in {out}")
    kept = f" (the {len(sweep.ratios)} parameter groups' ratios to the head kept)" if len(sweep.ratios) > 1 else ""
    print(f"suggested optim.lr={sweep.suggested:.2e}{kept}")
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    run_main(main)
