"""What the EMA of the weights (train.ema_decay) costs per optimizer step on this machine.

    python benchmarks/ema_cost.py                                   # the demo's CNN, batch 64, 24x24, CPU
    python benchmarks/ema_cost.py --model timm/resnet18 --image-size 64 --batch 32 --steps 50
    python benchmarks/ema_cost.py --device cuda --model timm/resnet50 --image-size 224 --batch 128

Prints milliseconds per training step (the real `train_step`: forward, backward, optimizer) with
and without the EMA update, measured in alternating rounds so a busy machine slows both alike,
and the update alone (`WeightEma.update`: one fused lerp over the parameters, a copy of the buffers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch import nn  # noqa: E402

from models import build_classifier  # noqa: E402
from trainer.fit.ema import WeightEma  # noqa: E402
from trainer.fit.step import StepCounters, StepOptions, StepParts, train_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    torch.manual_seed(0)
    model = build_classifier(args.model, 10).model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = WeightEma(accelerator.unwrap_model(model), 0.9998)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variants = {"without EMA": None, "with EMA": ema}
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    counters = StepCounters()
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name, with_ema in variants.items():
            parts = StepParts(accelerator, model, optimizer, scheduler, nn.CrossEntropyLoss(), StepOptions(), with_ema)
            sync(device)
            started = time.perf_counter()
            for i in range(args.steps):
                train_step(parts, x, y, counters, i)
            sync(device)
            if round_:
                per_step[name].append((time.perf_counter() - started) / args.steps * 1000)
    update = []
    for _ in range(args.rounds):
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            ema.update()
        sync(device)
        update.append((time.perf_counter() - started) / args.steps * 1000)
    params = sum(p.numel() for p in ema.module.parameters())
    print(f"{args.model}, {params:,} parameters, batch {args.batch} at {args.image_size}px on {device}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds (medians):")
    base = statistics.median(per_step["without EMA"])
    for name, times in per_step.items():
        print(f"  train step {name:<12} {statistics.median(times):8.3f} ms  ({statistics.median(times) / base:.3f}x)")
    print(f"  EMA update alone        {statistics.median(update):8.3f} ms  "
          f"({statistics.median(update) / base:.1%} of a step without it)")


if __name__ == "__main__":
    main()
