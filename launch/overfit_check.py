"""Sanity check before a long run: can the model drive the loss on ONE batch to near zero?

    python launch/overfit_check.py --config configs/regnet.toml data.root=/path/to/images
    python launch/overfit_check.py --config configs/demo.toml --steps 200 --target 0.02

A model, loss and optimizer that are wired correctly memorize one batch in a few dozen steps
(the campus-buildings seed does this first). The batch is the trainer's first one (trainer/assemble/run_parts.py).
Exit 0 when the loss went below --target, 1 when not.
"""

from __future__ import annotations

import argparse

from cli import config_parser, parse_config_args, run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.05, help="loss counted as near zero")
    return parse_config_args(parser, argv)


def main() -> int:
    from configs.errors import UsageError
    from trainer.assemble.run_config import load_config

    args = parse_args()
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    cfg = load_config(args.config, args.overrides)
    from data.folders import data_root

    data_root(cfg.data)  # a mistyped data.root answers now, not after the training imports
    from trainer.fit.diagnostics import overfit_one_batch

    result = overfit_one_batch(cfg, args.steps)
    for step, loss in result.losses.items():
        print(f"step {step:>4}  loss {loss:.4f}")
    ok = result.final_loss < args.target
    print(f"one batch of {result.images}: loss {result.first_loss:.4f} -> {result.final_loss:.4f}, accuracy "
          f"{result.accuracy:.2f} after {args.steps} steps: "
          + ("PASSED, the model can fit" if ok else
             f"FAILED, loss did not go below {args.target}; check the labels, the learning rate and what is frozen"))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
