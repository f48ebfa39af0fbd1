"""Fine-tuning recipes: stochastic depth, layer-wise lr decay, no weight decay on biases and norms,
gradient checkpointing, frozen BatchNorm; each composed with model.freeze, progressive unfreezing,
optim.backbone_lr_mult, the LR finder and resuming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainer.fit.diagnostics as diagnostics
from configs.errors import ConfigError, UsageError
from configs.schema import OptimConfig
from models import build_classifier, enable_grad_checkpointing, set_train_mode
from models.finetune import GroupRules, apply_epoch, make_plan, param_groups, prepare_for_wrapping
from trainer.assemble.run_config import load_config
from trainer.assemble.optim import build_optimizer, build_scheduler

TINY_RUN = ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.augment=none",
            "train.epochs=1", "runtime.device=cpu"]


def _groups_by_param(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g for g in groups for p in g["params"]}


# ----------------------------------------------------------------------------------------------
# model.drop_path_rate


def _drop_rates(model: nn.Module) -> list[float]:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    return [m.drop_prob if isinstance(m, DropPath) else m.p for m in model.modules()
            if isinstance(m, (DropPath, StochasticDepth))]


@pytest.mark.parametrize("name, rate, deepest", [
    ("timm/test_resnet", 0.1, 0.1),              # timm: linear over the blocks, the last one at the rate
    ("timm/resnet18", 0.2, 0.2),
    ("torchvision/efficientnet_b0", 0.3, 0.28),  # torchvision: rate x block index / blocks
])
def test_drop_path_rate_reaches_the_librarys_blocks(name, rate, deepest):
    rates = _drop_rates(build_classifier(name, 3, drop_path_rate=rate).model)
    assert max(rates) == pytest.approx(deepest, abs=0.01)
    assert sum(r > 0 for r in rates) >= len(rates) - 1  # torchvision's first block keeps 0
    if name.startswith("timm/"):  # timm's default is none
        assert not any(_drop_rates(build_classifier(name, 3).model))


def test_drop_path_rate_0_keeps_the_librarys_default():
    # torchvision's efficientnet builders default to 0.2; 0 means "not set", not "off".
    assert max(_drop_rates(build_classifier("torchvision/efficientnet_b0", 3).model)) == pytest.approx(0.1875)


@pytest.mark.parametrize("name, why", [
    ("torchvision/resnet18", "it takes no stochastic_depth_prob"),
    ("torchvision/vit_b_16", "it takes no stochastic_depth_prob"),
    ("torchvision/swin_t", "its builder sets it itself"),
    ("torchvision/mobilenet_v3_small", "it ignores stochastic_depth_prob"),
    ("timm/vgg11", "it takes no drop_path_rate"),
    ("tiny_cnn", "our models have no residual blocks"),
])
def test_drop_path_rate_is_refused_for_models_without_it(name, why):
    with pytest.raises(UsageError) as e:
        build_classifier(name, 3, drop_path_rate=0.1)
    assert str(e.value).startswith(f"model.drop_path_rate: {name} has no stochastic depth to set ({why}")
    assert "model.drop_path_rate=0" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("model.drop_path_rate=1.0", "model.drop_path_rate must be in [0, 1)"),
    ("optim.layer_decay=1.5", "optim.layer_decay must be 0 (off) or in (0, 1]"),
    ("optim.layer_decay=-0.1", "optim.layer_decay must be 0 (off) or in (0, 1]"),
    ("model.bn=eval", "model.bn = 'eval' is not one of: 'train', 'frozen'"),
])
def test_recipe_keys_out_of_range_name_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, [f"data.root={tmp_path}", "model.name=tiny_cnn", override])


# ----------------------------------------------------------------------------------------------
# optim.layer_decay and optim.no_decay_norm_bias


@pytest.mark.parametrize("freeze, bn, mult, decay", [
    ("none", "train", 1.0, 0.75),
    ("none", "train", 0.1, 0.5),    # composes with backbone_lr_mult
    ("last_2", "train", 0.5, 0.75),  # layer3 and layer4 train, at their depth's rates; the rest stays out
    ("last_2", "frozen", 1.0, 0.75),  # and no BatchNorm parameter is in any group
])
def test_layer_decay_scales_each_timm_layer_and_the_head_gets_the_full_rate(freeze, bn, mult, decay):
    built = build_classifier("timm/resnet18", 3)
    model, lr = built.model, 1e-3
    plan = make_plan(model, built.head_name, freeze, bn=bn)
    groups = param_groups(model, plan, lr, mult, GroupRules(layer_decay=decay))
    by_param = _groups_by_param(model, groups)
    # timm's fine grouping of a resnet18: the stem (layer 0), then its 8 blocks (layers 1..8), then the head.
    expected = {"fc.weight": lr, "fc.bias": lr, "layer4.1.conv2.weight": lr * mult * decay,
                "layer4.0.conv1.weight": lr * mult * decay ** 2, "layer3.1.conv1.weight": lr * mult * decay ** 3,
                "layer3.0.conv1.weight": lr * mult * decay ** 4}
    if freeze == "none":
        expected |= {"conv1.weight": lr * mult * decay ** 9, "layer1.0.conv1.weight": lr * mult * decay ** 8}
    for name, want in expected.items():
        assert by_param[name]["lr"] == pytest.approx(want), name
    assert set(by_param) == set(plan.head) | set(plan.backbone)  # exactly the plan: frozen ones stay out
    if freeze == "last_2":
        assert "layer2.1.conv2.weight" not in by_param and "conv1.weight" not in by_param
    assert any(".bn" in n for n in by_param) == (bn == "train")
    assert groups[0]["name"] == "head" and all(g["name"].startswith("backbone.layer_") for g in groups[1:])


def test_layer_decay_without_a_group_matcher_uses_the_freeze_units():
    built = build_classifier("torchvision/resnet18", 3)
    plan = make_plan(built.model, built.head_name, "none")
    by_param = _groups_by_param(built.model, param_groups(built.model, plan, 1.0, 1.0, GroupRules(layer_decay=0.5)))
    # units conv1, bn1, layer1, layer2, layer3, layer4, then the head
    assert [by_param[n]["lr"] for n in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight",
                                        "layer4.1.bn2.bias", "fc.weight")] == [0.5 ** 6, 0.5 ** 5, 0.5 ** 4, 0.5, 1.0]


def test_no_decay_norm_bias_exempts_biases_norms_1d_and_timms_own_names():
    built = build_classifier("timm/vit_tiny_patch16_224", 3)
    plan = make_plan(built.model, built.head_name, "none")
    groups = param_groups(built.model, plan, 1e-3, 1.0, GroupRules(weight_decay=0.05))
    optimizer = build_optimizer(groups, OptimConfig(name="adamw", weight_decay=0.05))
    decay = {n: g["weight_decay"] for n, g in _groups_by_param(built.model, optimizer.param_groups).items()}
    for name in ("pos_embed", "cls_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "norm.bias", "head.bias"):
        assert decay[name] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"):
        assert decay[name] == 0.05, name
    assert [g["name"] for g in groups] == ["head", "head.no_decay", "backbone.no_decay", "backbone"]


@pytest.mark.parametrize("rules, names", [
    (GroupRules(), ["head", "backbone"]),                                   # the defaults: the layout as before
    (GroupRules(weight_decay=0.05, no_decay_norm_bias=False), ["head", "backbone"]),
    (GroupRules(weight_decay=0.0, no_decay_norm_bias=True), ["head", "backbone"]),  # nothing to exempt
    (GroupRules(weight_decay=0.05), ["head", "head.no_decay", "backbone", "backbone.no_decay"]),
])
def test_the_groups_split_only_when_asked(rules, names):
    built = build_classifier("tiny_cnn", 3)
    plan = make_plan(built.model, built.head_name, "none")
    groups = param_groups(built.model, plan, 0.1, 0.5, rules)
    assert [g["name"] for g in groups] == names


def test_progressive_unfreezing_zeroes_every_backbone_group_and_keeps_their_ratios():
    built = build_classifier("timm/test_resnet", 3)
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.05, backbone_lr_mult=0.5, layer_decay=0.5)
    plan = make_plan(built.model, built.head_name, "none", unfreeze_at_epoch=1)
    optimizer = build_optimizer(param_groups(built.model, plan, cfg.lr, cfg.backbone_lr_mult, GroupRules.of(cfg)), cfg)
    configured = [g["lr"] for g in optimizer.param_groups]
    scheduler = build_scheduler(optimizer, cfg, plan, steps_per_epoch=2, epochs=2)
    first = [g["lr"] for g in optimizer.param_groups]
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    second = [g["lr"] for g in optimizer.param_groups]
    heads = [g["name"].startswith("head") for g in optimizer.param_groups]
    assert len(heads) > 4 and sum(heads) == 2
    assert first == [lr if head else 0.0 for lr, head in zip(configured, heads)]
    assert second == pytest.approx(configured)


def test_lr_finder_sweeps_the_base_rate_and_keeps_every_groups_ratio(image_folder, tmp_path):
    cfg = load_config(None, [f"data.root={image_folder}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                             *TINY_RUN, "optim.layer_decay=0.5", "optim.backbone_lr_mult=0.5",
                             "optim.weight_decay=0.01"])
    sweep = diagnostics.lr_sweep(cfg, 1e-4, 1e-2, 3)
    # tiny_cnn's units: features.0, .2, .4 (BatchNorm), .6, .8 (BatchNorm), fc1; then the head fc.
    assert sorted(set(sweep.ratios), reverse=True) == pytest.approx([1.0] + [0.5 * 0.5 ** k for k in range(1, 7)])
    assert sweep.ratios[:2] == [1.0, 1.0]  # the head, and its bias without weight decay


def test_the_groups_are_summarised_in_one_line_at_the_start(image_folder, tmp_path, capsys):
    cfg = load_config(None, [f"data.root={image_folder}", "model.name=timm/test_resnet", *TINY_RUN,
                             "data.batch_size=16", "optim.layer_decay=0.75", "optim.weight_decay=0.05"])
    diagnostics.prepare(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("optimizer:")]
    # test_resnet: a stem and 4 one-block stages, each split by weight decay, plus the head's two;
    # 31 of its 47 tensors are biases or 1-D; the stem is 5 layers from the head: 0.75^5 = 0.237.
    assert lines == ["optimizer: 12 parameter groups, lr 0.000237 .. 0.001 (head 0.001); no weight decay on "
                     "31 of 47 tensors (biases, norms, 1-D)"]


# ----------------------------------------------------------------------------------------------
# Resuming: the saved optimizer state must have this config's group layout


def _optimizer_state(rules: GroupRules) -> dict:
    built = build_classifier("tiny_cnn", 3)
    plan = make_plan(built.model, built.head_name, "none")
    optimizer = build_optimizer(param_groups(built.model, plan, 0.1, 1.0, rules),
                                OptimConfig(name="adamw", weight_decay=rules.weight_decay))
    built.model(torch.rand(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _resume_into(rules: GroupRules, state: dict) -> None:
    built = build_classifier("tiny_cnn", 3)
    plan = make_plan(built.model, built.head_name, "none")
    optimizer = build_optimizer(param_groups(built.model, plan, 0.1, 1.0, rules),
                                OptimConfig(name="adamw", weight_decay=rules.weight_decay))
    optimizer.load_state_dict(state)


def test_a_run_saved_before_the_new_keys_resumes_when_their_layout_matches():
    legacy = _optimizer_state(GroupRules(weight_decay=0.0))  # what every run without weight decay saved
    _resume_into(GroupRules(weight_decay=0.0), legacy)       # the new defaults: same two groups
    decayed = _optimizer_state(GroupRules(weight_decay=0.05, no_decay_norm_bias=False))
    _resume_into(GroupRules(weight_decay=0.05, no_decay_norm_bias=False), decayed)
    with pytest.raises(UsageError) as e:  # weight decay saved without exemptions, resumed with the default
        _resume_into(GroupRules(weight_decay=0.05), decayed)
    assert str(e.value).startswith("cannot resume: the checkpoint's optimizer has 2 parameter groups (head (2), "
                                   "backbone (12)) but this config makes 4 (head (1), head.no_decay (1), ")
    assert "optim.no_decay_norm_bias=false" in str(e.value)


def test_a_real_run_with_weight_decay_resumes_in_the_layout_it_was_saved_with(image_folder, tmp_path,
                                                                              fresh_accelerate_state):
    import json

    import trainer.fit.loop as loop
    from helpers import reset_accelerate_state

    run_dir = tmp_path / "run"
    common = [f"data.root={image_folder}", f"run.dir={run_dir}", "model.name=tiny_cnn", *TINY_RUN,
              "optim.weight_decay=0.05"]
    loop.train(load_config(None, [*common, "optim.no_decay_norm_bias=false"]))  # the layout older code saved
    resumed = [*common, "train.epochs=2", "run.resume=auto"]
    reset_accelerate_state()
    config_before = (run_dir / "config.toml").read_bytes()
    with pytest.raises(UsageError, match=r"^cannot resume: optim.no_decay_norm_bias is True but the checkpoint "
                                         r"was trained with False; set optim.no_decay_norm_bias=False"):
        loop.train(load_config(None, resumed))
    assert (run_dir / "config.toml").read_bytes() == config_before  # refused before anything is written
    reset_accelerate_state()
    loop.train(load_config(None, [*resumed, "optim.no_decay_norm_bias=false"]))
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


# ----------------------------------------------------------------------------------------------
# runtime.grad_checkpointing


def test_grad_checkpointing_recomputes_timm_blocks_in_the_backward_pass(image_folder):
    def forward_calls(checkpointing: bool) -> int:
        torch.manual_seed(0)
        built = build_classifier("timm/test_resnet", 3)
        if checkpointing:
            enable_grad_checkpointing(built)
        calls = []
        # A pre-hook: the recomputation stops as soon as it has what backward needs, before the block returns.
        built.model.layer2[0].register_forward_pre_hook(lambda *_: calls.append(1))
        built.model.train()
        built.model(torch.rand(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in built.model.parameters())
        return len(calls)

    assert (forward_calls(False), forward_calls(True)) == (1, 2)


def test_grad_checkpointing_through_the_run_trains_a_step(image_folder):
    cfg = load_config(None, [f"data.root={image_folder}", "model.name=timm/test_resnet", *TINY_RUN,
                             "data.image_size=32", "runtime.grad_checkpointing=true"])
    run = diagnostics.prepare(cfg)
    assert run.parts.built.model.grad_checkpointing is True
    stem = run.parts.built.model.conv1[0].weight
    before = stem.detach().clone()
    assert torch.isfinite(torch.tensor(run.step(*next(run.batches()))))
    assert not torch.equal(before, stem)  # the gradient went back through the recomputed blocks


@pytest.mark.parametrize("name", ["torchvision/resnet18", "tiny_cnn"])
def test_grad_checkpointing_is_refused_for_models_without_it(name):
    with pytest.raises(UsageError, match=rf"^runtime.grad_checkpointing: {name} cannot recompute its activations "
                                         r"\(only timm models have set_grad_checkpointing\)"):
        enable_grad_checkpointing(build_classifier(name, 3))


# ----------------------------------------------------------------------------------------------
# model.bn


def test_frozen_batchnorm_keeps_statistics_and_affine_through_train_mode_and_sync_bn():
    torch.manual_seed(0)
    built = build_classifier("tiny_cnn", 3)
    plan = make_plan(built.model, built.head_name, "none", bn="frozen")
    prepare_for_wrapping(built.model, plan)
    # What runtime.sync_bn does before DDP wraps the model (the layers become SyncBatchNorm).
    model = nn.SyncBatchNorm.convert_sync_batchnorm(built.model)
    optimizer = build_optimizer(param_groups(model, plan, 0.1, 1.0), OptimConfig(name="sgd", lr=0.1))
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("features.4", "features.8"))}
    conv = model.features[0].weight.detach().clone()
    for epoch in (1, 2):
        apply_epoch(model, plan, epoch)
        set_train_mode(model)  # what the loop calls every epoch
        loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 and all(isinstance(m, nn.SyncBatchNorm) and not m.training for m in bns)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_state.items())
    assert not torch.equal(conv, model.features[0].weight)  # the rest trains


@pytest.mark.parametrize("overrides, warned", [
    ([], True),
    (["model.bn=frozen"], False),
    (["data.batch_size=16"], False),
    (["model.freeze=backbone"], False),                     # the BatchNorm layers are frozen with the backbone
    (["model.freeze=last_1", "model.name=torchvision/resnet18"], True),  # layer4's BatchNorm trains
    (["model.name=tiny_cnn_nobn"], False),
])
def test_batchnorm_on_small_batches_is_one_warning_at_the_start(overrides, warned, image_folder, capsys):
    cfg = load_config(None, [f"data.root={image_folder}", "model.name=tiny_cnn", *TINY_RUN, *overrides])
    diagnostics.prepare(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if "BatchNorm" in line]
    batch = cfg.data.batch_size
    assert lines == ([f"warning: BatchNorm trains on per-process batches of {batch}: its statistics will be noisy; "
                      f"consider model.bn=frozen or a larger batch"] if warned else [])


@pytest.mark.parametrize("override, message", [
    ("model.drop_path_rate=0.1", "error: model.drop_path_rate: tiny_cnn has no stochastic depth to set"),
    ("runtime.grad_checkpointing=true", "error: runtime.grad_checkpointing: tiny_cnn cannot recompute"),
])
def test_a_recipe_the_model_lacks_is_one_line_exit_2_nothing_written(override, message, image_folder, tmp_path):
    from helpers import run_in_process

    run_dir = tmp_path / "run"
    result = run_in_process("train.py", f"data.root={image_folder}", "model.name=tiny_cnn", f"run.dir={run_dir}",
                            "train.epochs=1", override, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("saved_optim, overrides, refused", [
    ({"weight_decay": 0.05}, ["optim.weight_decay=0.05"], "optim.no_decay_norm_bias is True but the checkpoint "
                                                          "was trained with False"),  # saved before the key
    ({"weight_decay": 0.0}, [], None),  # without weight decay the exemptions change no group
    ({"weight_decay": 0.05, "no_decay_norm_bias": False}, ["optim.weight_decay=0.05",
                                                           "optim.no_decay_norm_bias=false"], None),
    ({"layer_decay": 0.75}, [], "optim.layer_decay is 0.0 but the checkpoint was trained with 0.75"),
])
def test_resume_refuses_recipe_changes_before_anything_is_written(saved_optim, overrides, refused):
    from trainer.fit.restore import config_changes

    cfg = load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", *overrides])
    saved = cfg.to_dict()
    saved["optim"] = {k: v for k, v in saved["optim"].items() if k not in ("no_decay_norm_bias", "layer_decay")}
    saved["optim"].update(saved_optim)
    if refused is None:
        assert config_changes(saved, cfg, ["a"], ["a"]) == []
    else:
        with pytest.raises(UsageError, match=refused):
            config_changes(saved, cfg, ["a"], ["a"])
