"""Run under `accelerate launch --num_processes 2`: draw two epochs through training's TrainBatches
with a BalancedDraw and write, per process, the indices it received (for test_balance_ddp.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from data.balance import BalancedDraw  # noqa: E402
from data.dataset import Loading  # noqa: E402
from data.sampling import TrainBatches  # noqa: E402


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
    loader = TrainBatches(Labels(labels), 16, Loading(0), 3, accelerator, BalancedDraw(labels, seed=3).indices)
    record = {}
    for epoch in range(2):
        loader.start_epoch(epoch)
        indices = [int(i) for batch_indices, _ in loader for i in batch_indices]
        record[f"epoch{epoch}"] = indices
    record["world"] = accelerator.num_processes
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
