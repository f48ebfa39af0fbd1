"""W&B runs (offline, read back from their own files), the local PNGs, one run under DDP, and an
unreachable server that must not stop training. Nothing here reaches the network: every W&B
process gets a base URL on a closed local port and a private HOME."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.reporting import plots
from trainer.task.metrics import confusion_matrix, per_class_accuracy
from configs.errors import ConfigError
from trainer.reporting.tracking import resolve_mode


@pytest.mark.parametrize("env, config_mode, expected", [
    (None, "offline", "offline"), ("", "online", "online"), ("disabled", "online", "disabled"),
    ("offline", "disabled", "offline"), ("DRYRUN", "online", "offline"), ("run", "disabled", "online")])
def test_wandb_mode_env_wins_over_config(monkeypatch, env, config_mode, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_mode(config_mode) == expected


def test_bad_wandb_mode_env_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' is not one of: online, offline, disabled"):
        resolve_mode("offline")


def test_confusion_matrix_and_per_class_accuracy():
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), [0, 1, 1, 2, 2, 0], 4).tolist() == matrix.tolist()
    rows = per_class_accuracy(matrix.numpy(), ["a", "b", "c", "d"])
    assert [(r["class"], r["images"], r["correct"]) for r in rows] == [("a", 2, 1), ("b", 1, 1), ("c", 3, 2),
                                                                      ("d", 0, 0)]
    assert rows[2]["accuracy"] == pytest.approx(2 / 3) and np.isnan(rows[3]["accuracy"])


def test_denormalize_inverts_normalize():
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 4, 4)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalized = (pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(plots.denormalize(normalized.astype(np.float32), mean, std), pixels.transpose(0, 2, 3, 1),
                       atol=1e-6)


def test_progress_lines_when_stdout_is_not_a_terminal(capsys):
    from types import SimpleNamespace

    from trainer.reporting.console import ProgressLines

    lines = ProgressLines(SimpleNamespace(is_main_process=True), 1e-9, batch_size=32)  # captured stdout: no tty
    assert lines.due()
    lines.show(epoch=2, position=9, total=40, loss=0.5, batches_since_start=10)
    out = capsys.readouterr().out
    assert out.startswith("epoch 2 step 10/40 (25%): loss 0.5000, ") and "img/s, epoch ends in" in out
    assert not ProgressLines(SimpleNamespace(is_main_process=True), 0, 32).due()  # 0: off
    assert not ProgressLines(SimpleNamespace(is_main_process=False), 1e-9, 32).due()  # other ranks: never
