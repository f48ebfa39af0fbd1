"""Sanity check before a long run: can the model drive the loss on ONE batch to near zero?

    python launch/overfit_check.py --config configs/regnet.toml data.root=/path/to/images
    python launch/overfit_check.py --config configs/demo.toml --steps 200 --target 0.02

A model, loss and optimizer that are wired correctly memorize one batch in a few dozen steps
(the campus-buildings seed does this first). Exit 0 when the loss went below --target, 1 when not.
"""

from __future__ import annotations

import argparse

from cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.05, help="loss counted as near zero")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    from models import set_train_mode
    from trainer.build import load_config
    from trainer.probe import build_probe

    probe = build_probe(load_config(args.config, args.overrides), args.device)
    images, labels = next(iter(probe.loader))
    images, labels = images.to(probe.device), labels.to(probe.device)
    set_train_mode(probe.model)
    first = None
    for step in range(1, args.steps + 1):
        loss = probe.criterion(probe.model(images), labels)
        first = loss.item() if first is None else first
        probe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        probe.optimizer.step()
        if step == 1 or step % 20 == 0:
            print(f"step {step:>4}  loss {loss.item():.4f}")
    probe.model.eval()  # the final check without dropout, as the batch would be seen at evaluation
    with __import__("torch").no_grad():
        logits = probe.model(images)
        final = probe.criterion(logits, labels).item()
        acc = (logits.argmax(1) == labels).float().mean().item()
    ok = final < args.target
    print(f"one batch of {len(labels)}: loss {first:.4f} -> {final:.4f}, accuracy {acc:.2f} after {args.steps} steps: "
          + ("PASSED, the model can fit" if ok else
             f"FAILED, loss did not go below {args.target}; check the labels, the learning rate and what is frozen"))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
