"""Small training-loop behaviours: the schedules shapes."""

import pytest
import torch

from configs.schema import OptimConfig
from trainer.assemble.optim import lr_factor


def test_step_schedule_matches_torch_steplr_at_epoch_boundaries():
    cfg = OptimConfig(scheduler="step", step_size=7, gamma=0.1, lr=1e-3)
    steps_per_epoch = 5
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([param], lr=1e-3), step_size=7, gamma=0.1)
    for epoch in range(20):
        ours = 1e-3 * lr_factor(epoch * steps_per_epoch, cfg, steps_per_epoch, 100)
        assert ours == pytest.approx(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(scheduler="cosine", warmup_epochs=1, lr=1.0, min_lr=0.1)
    factors = [lr_factor(s, cfg, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, cfg, 10, 100) == pytest.approx(0.1)


def test_warmup_comes_before_every_schedule():
    from configs.schema import OptimConfig

    for scheduler in ("none", "step", "cosine"):
        cfg = OptimConfig(scheduler=scheduler, warmup_epochs=1.0, step_size=3)
        factors = [lr_factor(s, cfg, 10, 100) for s in range(12)]
        assert factors[:10] == [(s + 1) / 10 for s in range(10)], scheduler
        assert factors[10] == pytest.approx(1.0, abs=0.01), scheduler
