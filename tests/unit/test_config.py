"""Config parsing and validation: every error is one line that names the key and the fix."""

import pytest

from configs.schema import Config
from trainer.assemble.run_config import load_config
from configs.errors import ConfigError

BASE = ["data.root=/tmp/x", "model.name=tiny_cnn"]


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_typed_overrides(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\nroot = "/data"\n[model]\nname = "timm/resnet18"\n'),
                      ["train.epochs=3", "optim.lr=1e-4", "model.pretrained=true", "data.mean=[0.5, 0.5, 0.5]",
                       "data.std=[0.5,0.5,0.5]", "data.normalize=custom", "wandb.tags=['a', 'b']",
                       "model.name=torchvision/resnet18", "optim.weight_decay=0"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-4 and cfg.model.pretrained is True
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.wandb.tags == ["a", "b"]
    assert cfg.model.name == "torchvision/resnet18"
    assert isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.batch_size == Config().data.batch_size


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, BASE + ["wandb.tags=['x']", "data.val_fraction=0.15"])
    again = load_config(write(tmp_path, cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize("toml, overrides, message", [
    ("", ["data.rot=/x"], "unknown key 'data.rot' in overrides; did you mean 'data.root'?"),
    ("[data]\nbatchsize = 3\n", [], "unknown key 'data.batchsize' in {path}; did you mean 'data.batch_size'?"),
    ("[dta]\nroot = 'x'\n", [], "unknown section [dta] in {path}; did you mean 'data'?"),
    ("", ["train.epochs=three"], "train.epochs must be an integer, got 'three'"),
    ("[train]\nepochs = 2.5\n", [], "train.epochs must be an integer, got 2.5"),
    ("", ["model.pretrained=maybe"], "model.pretrained must be true or false, got 'maybe'"),
    ("", ["optim.name=adan"], "optim.name = 'adan' is not one of: 'sgd', 'adam', 'adamw'; did you mean 'adam'?"),
    ("", ["train.precision=fp8"], "train.precision = 'fp8' is not one of: 'auto', 'no', 'bf16', 'fp16'"),
    ("", ["train.precision=fp32"], "did you mean 'no'?"),  # the name people use for full precision
    ("", ["train.precision=32-true"], "did you mean 'no'?"),  # PyTorch Lightning's names
    ("", ["train.precision=bf16-mixed"], "did you mean 'bf16'?"),
    ("", ["train.precision=mixed"], "did you mean 'bf16' or 'fp16'?"),
    ("", ["train.precision=FP16"], "did you mean 'fp16'?"),
    ("", ["optim.scheduler=onecycle"], "is not one of: 'none', 'step', 'cosine'; did you mean 'cosine' (with "
                                       "optim.warmup_epochs for one-cycle's warm-up)?"),
    ("", ["optim.scheduler=CosineAnnealingLR"], "did you mean 'cosine'?"),
    ("", ["optim.scheduler=off"], "did you mean 'none'?"),
    ("", ["optim.scheduler=plateau"], "optim.scheduler = 'plateau' is not one of: 'none', 'step', 'cosine'"),
    ("", ["optim.name=AdamW"], "did you mean 'adamw'?"),  # not 'adam'
    ("", ["runtime.device=gpu"], "did you mean 'cuda'?"),  # not 'cpu'
    ("", ["optim.warmup_epochs=12", "train.epochs=10"], "optim.warmup_epochs (12) must be at most train.epochs (10)"),
    ("", ["model.weights=/"], "model.weights / is a folder; give the weights file in it"),
    ("", ["data.num_workers=many"], 'data.num_workers must be an integer or "auto", got \'many\''),
    ("", ["data.decode=gpu"], "data.decode = 'gpu' is not one of: 'auto', 'cpu', 'cuda'"),
    ("", ["epochs=3"], "override key 'epochs' must be section.key"),
    ("", ["train.epochs"], "override 'train.epochs' must look like section.key=value, e.g. train.epochs=3"),
    ("", ["data.val_fraction=1.5"], "data.val_fraction must be between 0 and 1 (exclusive)"),
    ("", ["train.epochs=0"], "train.epochs must be at least 1"),
    ("", ["data.normalize=custom"], "data.normalize = 'custom' needs data.mean and data.std with 3 numbers each"),
    ("", ["model.weights=/no/such/file.safetensors"], "model.weights file not found: /no/such/file.safetensors"),
    ("[data]\nroot = 'x'\n[model]\nname = 'tiny_cnn'\n", ["data.root="], "data.root is not set"),
    ("[data\n", [], "is not valid TOML"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, toml, overrides, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, BASE + overrides)
    text = str(err.value)
    assert message.format(path=path) in text
    assert "\n" not in text


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: /nope.toml"):
        load_config("/nope.toml", BASE)


@pytest.mark.parametrize("override, message", [
    ("data.root=" + "a" * 10_000_000, "data.root is 10,000,000 characters long (it starts 'aaaa"),
    ("model.weights=" + "w" * 4097, "model.weights takes at most 4,096: give a path or a name, not a file's content"),
    ("optim.name=" + "x" * 5000, "optim.name is 5,000 characters long"),  # before its choices are compared
    ("wandb.tags=['ok', '" + "t" * 5000 + "']", "wandb.tags[1] is 5,000 characters long"),
    ("wandb.notes=" + "n" * 70_000, "wandb.notes takes at most 65,536: shorten it"),
])
def test_a_string_value_longer_than_its_key_takes_is_one_line_naming_the_key_and_limit(override, message):
    """A 10 MB value would be copied into config.toml, state.json and every model file's header."""
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    text = str(err.value)
    assert message in text and "\n" not in text and len(text) < 300


def test_long_strings_where_a_key_takes_them(tmp_path):
    notes = "a run's description " * 2000  # 40,000 characters of free text
    cfg = load_config(write(tmp_path, f'[wandb]\nnotes = "{notes}"\n'), BASE + ["data.root=/" + "d" * 4000])
    assert cfg.wandb.notes == notes and len(cfg.data.root) == 4001
    with pytest.raises(ConfigError, match=r"^data\.root is 5,000 characters long"):  # in a TOML file too
        load_config(write(tmp_path, f'[data]\nroot = "{"r" * 5000}"\n'), ["model.name=tiny_cnn"])
