"""Fine-tuning schedules: which parameters train, with which learning rate, in which epoch."""

import pytest
import torch
from torch import nn

from models import build_classifier
from models.finetune import (apply_epoch, backbone_units, make_plan, param_groups,
                             parse_freeze, prepare_for_wrapping, unit_names)
from configs.schema import OptimConfig
from trainer.assemble.run_config import load_config
from configs.errors import ConfigError, UsageError
from trainer.assemble.optim import build_optimizer, build_scheduler


def _trained_by_one_step(model_name: str, freeze: str, epoch: int = 1, unfreeze_at: int = 0) -> tuple[set, set]:
    torch.manual_seed(0)
    built = build_classifier(model_name, 3)
    model = built.model
    plan = make_plan(model, built.head_name, freeze, unfreeze_at)
    prepare_for_wrapping(model, plan)
    optimizer = build_optimizer(param_groups(model, plan, 0.1, 1.0), OptimConfig(name="adam", lr=0.1))
    apply_epoch(model, plan, epoch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # timm zero-initializes each block's last BatchNorm scale, so some parameters that do train get a
    # zero first gradient and do not move yet: "trains" means it gets a gradient and the optimizer has it.
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trained = {n for n, p in model.named_parameters() if p.grad is not None and id(p) in in_optimizer}
    assert changed <= trained
    return trained, set(plan.head)


@pytest.mark.parametrize("model_name", ["tiny_cnn", "timm/test_resnet"])
def test_each_freeze_mode_trains_exactly_its_parameters(model_name):
    built = build_classifier(model_name, 3)
    everything = {n for n, _ in built.model.named_parameters()}
    units = backbone_units(built.model, built.head_name)

    trained, head = _trained_by_one_step(model_name, "none")
    assert trained == everything
    trained, head = _trained_by_one_step(model_name, "backbone")
    assert trained == head
    trained, head = _trained_by_one_step(model_name, "last_2")
    assert trained == head | set(units[-1]) | set(units[-2])
    # Progressive: the head alone before the unfreeze epoch, everything after it.
    trained, head = _trained_by_one_step(model_name, "none", epoch=2, unfreeze_at=2)
    assert trained == head
    trained, head = _trained_by_one_step(model_name, "none", epoch=3, unfreeze_at=2)
    assert trained == everything


def test_units_are_named_per_family():
    built = build_classifier("torchvision/resnet18", 3)
    assert unit_names(built.model, built.head_name) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    built = build_classifier("timm/test_resnet", 3)
    assert unit_names(built.model, built.head_name)[-1].startswith("layer4")  # one block: layer4.0
    with pytest.raises(UsageError, match="asks for 9 units but this backbone has 6"):
        make_plan(build_classifier("torchvision/resnet18", 3).model, "fc", "last_9")


@pytest.mark.parametrize("value, message", [
    ("last_0", "'last_N' with N >= 1"), ("top_2", "'last_N' with N >= 1"), ("frozen", "one of 'none'")])
def test_bad_freeze_modes_say_what_works(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_freeze(value)


@pytest.mark.parametrize("overrides, message", [
    (["model.freeze=backbone", "train.unfreeze_at_epoch=1"], "nothing to unfreeze|needs something to unfreeze"),
    (["train.unfreeze_at_epoch=3", "train.epochs=3"], "would never train"),
    (["train.cache_features=true"], "model.freeze=backbone"),
    (["train.cache_features=true", "model.freeze=backbone"], "data.augment=none"),
    (["optim.backbone_lr_mult=0"], "backbone_lr_mult must be positive"),
])
def test_fine_tuning_config_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", *overrides])


def test_schedule_is_a_pure_function_of_the_step_so_resume_recomputes_it():
    built = build_classifier("tiny_cnn", 3)
    cfg = OptimConfig(name="sgd", lr=0.1, scheduler="step", step_size=2, gamma=0.5, backbone_lr_mult=0.1)
    plan = make_plan(built.model, built.head_name, "none", unfreeze_at_epoch=2)
    steps_per_epoch, epochs = 3, 5

    def lrs_by_epoch(resume_at_step: int | None = None):
        opt = build_optimizer(param_groups(built.model, plan, cfg.lr, cfg.backbone_lr_mult), cfg)
        sched = build_scheduler(opt, cfg, plan, steps_per_epoch, epochs)
        out = {}
        for step in range(steps_per_epoch * epochs):
            if resume_at_step is not None and step == resume_at_step:  # a fresh process picks up here
                state, opt_state = sched.state_dict(), opt.state_dict()
                opt = build_optimizer(param_groups(built.model, plan, cfg.lr, cfg.backbone_lr_mult), cfg)
                sched = build_scheduler(opt, cfg, plan, steps_per_epoch, epochs)
                opt.load_state_dict(opt_state)
                sched.load_state_dict(state)
                assert "lr_lambdas" not in state or all(x is None for x in state["lr_lambdas"])  # nothing pickled
            if step % steps_per_epoch == 0:
                epoch = step // steps_per_epoch + 1
                apply_epoch(built.model, plan, epoch)
                trainable = sum(p.requires_grad for p in built.model.parameters())
                out[epoch] = ([g["name"] for g in opt.param_groups], [round(g["lr"], 8) for g in opt.param_groups],
                              trainable)
            opt.step()
            sched.step()
        return out

    straight = lrs_by_epoch()
    n_head, n_all = len(plan.head), len(list(built.model.parameters()))
    assert straight[1] == (["head", "backbone"], [0.1, 0.0], n_head)
    assert straight[2] == (["head", "backbone"], [0.1, 0.0], n_head)  # step decay every 2 epochs
    assert straight[3] == (["head", "backbone"], [0.05, 0.005], n_all)
    assert straight[5] == (["head", "backbone"], [0.025, 0.0025], n_all)
    assert lrs_by_epoch(resume_at_step=6) == straight
