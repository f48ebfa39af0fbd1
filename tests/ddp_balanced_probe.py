"""Run under `accelerate launch --num_processes 2`: draw one epoch through a prepared DataLoader with
BalancedSampler and write, per process, the labels it received (for test_balance.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from data.balance import BalancedSampler  # noqa: E402


class Labels(Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i, self.labels[i]


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    labels = [0] * 600 + [1] * 300 + [2] * 60  # 10:5:1 imbalance
    sampler = BalancedSampler(labels, seed=3)
    loader = accelerator.prepare(DataLoader(Labels(labels), batch_size=16, sampler=sampler))
    record = {}
    for epoch in range(2):
        indices = [int(i) for batch_indices, _ in loader for i in batch_indices]
        record[f"epoch{epoch}"] = indices
    record["world"] = accelerator.num_processes
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
