"""Learning-rate finder: an exponential sweep of the learning rate over a few hundred steps.

    python launch/lr_find.py --config configs/demo.toml
    python launch/lr_find.py --config configs/regnet.toml data.root=/path --start 1e-7 --end 1 --steps 200

Every parameter group is scaled by the same factor, so the ratio between the head and the backbone
(optim.backbone_lr_mult) is kept. Writes the loss-vs-lr plot (--out, default lr_find.png) and prints
a suggestion for optim.lr: the steepest descent of the smoothed loss.
"""

from __future__ import annotations

import argparse
import math

from cli import run_main


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The learning rate where the smoothed loss falls fastest (per decade of lr)."""
    if len(lrs) < 3:
        return lrs[0]
    logs = [math.log10(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(lrs) - 1)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config")
    parser.add_argument("--start", type=float, default=1e-7)
    parser.add_argument("--end", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="lr_find.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    from models import set_train_mode
    from trainer.build import load_config
    from configs.errors import UsageError
    from trainer.probe import build_probe

    if not (0 < args.start < args.end) or args.steps < 3:
        raise UsageError("need 0 < --start < --end and --steps >= 3")
    cfg = load_config(args.config, args.overrides)
    probe = build_probe(cfg, args.device)
    # Each group's rate relative to optim.lr (1 for the head, backbone_lr_mult for the backbone).
    ratios = [g["lr"] / cfg.optim.lr for g in probe.optimizer.param_groups]
    set_train_mode(probe.model)
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches = iter(probe.loader)
    for step in range(args.steps):
        lr = args.start * (args.end / args.start) ** (step / (args.steps - 1))
        for group, ratio in zip(probe.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(probe.loader)
            images, labels = next(batches)
        loss = probe.criterion(probe.model(images.to(probe.device)), labels.to(probe.device))
        probe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        probe.optimizer.step()
        # Exponential moving average with bias correction, as in fastai's and Leslie Smith's finders.
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (step + 1))
        if not math.isfinite(value) or value > 4 * best:
            break  # diverged: the rest of the curve says nothing
        best = min(best, value)
        lrs.append(lr)
        losses.append(value)
    lr = suggest(lrs, losses)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(lr, color="red", linestyle="--", label=f"suggested {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("smoothed training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"swept {len(lrs)} steps from {lrs[0]:.1e} to {lrs[-1]:.1e}; plot in {args.out}")
    print(f"suggested optim.lr={lr:.2e}" + (f" (backbone x{cfg.optim.backbone_lr_mult:g} kept)"
                                           if len(ratios) > 1 else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
