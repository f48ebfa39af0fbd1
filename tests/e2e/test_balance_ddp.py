"""Balanced sampling under a real 2-process CPU DDP accelerate launch: equal classes, disjoint shares."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from helpers import REPO, accelerate_launch, run_env
from data.balance import BalancedDraw

LABELS = [0] * 600 + [1] * 300 + [2] * 60


def test_two_process_ddp_draws_each_class_about_equally(tmp_path):
    cmd = [*accelerate_launch("--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"),
           str(REPO / "tests" / "ddp_balanced_probe.py"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=run_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    for epoch in ("epoch0", "epoch1"):
        per_rank = [r[epoch] for r in ranks]
        assert per_rank[0] != per_rank[1]  # each process draws its own share
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 16
        together = per_rank[0] + per_rank[1]
        assert len(together) == len(LABELS)  # the epoch stays the dataset's length (960 = 60 batches of 16)
        # The two shares are exactly the (seed, epoch) draw.
        assert Counter(together) == Counter(BalancedDraw(LABELS, seed=3).indices(int(epoch[-1])))
        shares = Counter(LABELS[i] for i in together)
        for cls in range(3):
            assert shares[cls] / len(together) == pytest.approx(1 / 3, abs=0.05), shares
    assert ranks[0]["epoch0"] != ranks[0]["epoch1"]  # a fresh draw every epoch
