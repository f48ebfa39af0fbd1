"""Training-step speed on this machine's CPU: fp32 vs bf16 autocast, and channels_last.

    python benchmarks/precision_cpu.py [--width 32] [--image-size 64] [--batch 32] [--steps 5]

Prints seconds per step and the ratio to fp32, measured side by side in one run (alternating, so
a busy machine slows every variant alike). Whether this CPU runs bf16 natively is printed too:
without AVX512-BF16/AMX, oneDNN emulates it and bf16 is expected to be slower, which is why
trainer/assemble/accelerator.py turns fp16-on-CPU into fp32 there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.simple_cnn import SimpleCNN  # noqa: E402
from trainer.assemble.accelerator import cpu_has_native_bf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    variants = {"fp32": (False, False), "bf16": (True, False), "fp32+channels_last": (False, True)}
    models = {}
    for name, (_, channels_last) in variants.items():
        model = SimpleCNN(num_classes=10, width=args.width, hidden=128, dropout=0.0)
        models[name] = (model.to(memory_format=torch.channels_last) if channels_last else model,
                        torch.optim.SGD(model.parameters(), lr=0.01))
    times = {name: [] for name in variants}

    def step(name):
        bf16, channels_last = variants[name]
        model, opt = models[name]
        inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name in variants:
        step(name)  # warm-up: oneDNN picks kernels on first use
    for _ in range(args.rounds):
        for name in variants:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - started) / args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}")
    base = statistics.median(times["fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20} {median * 1000:9.1f} ms/step  x{median / base:.2f} vs fp32")


if __name__ == "__main__":
    main()
