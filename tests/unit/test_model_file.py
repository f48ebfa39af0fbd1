"""Model files: bare key names on save and load, preprocessing recorded, older files still load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from configs.errors import UsageError
from configs.schema import Config
from data.transforms import Preprocessing
from models import HeadSpec, build_classifier
from configs.schema import config_from_dict
from models.build import bare_keys
from trainer.files.model_file import ClassifierFacts, load_classifier, read_metadata, save_classifier

CLASSES = ["blue", "green", "red"]


def _model():
    torch.manual_seed(0)
    return build_classifier("tiny_cnn", len(CLASSES)).model.eval()


def _facts(crop_mode="squash", augment="stretch"):
    config = Config()
    config.data.augment = augment
    return ClassifierFacts("tiny_cnn", HeadSpec().to_dict(), CLASSES,
                           Preprocessing(16, 0.875, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), crop_mode), config.to_dict(),
                           runtime={"num_processes": 1, "global_batch_size": 8})


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_saved_keys_are_the_bare_models(tmp_path, prefix):
    model = _model()
    wrapped = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "best.safetensors"
    save_classifier(path, wrapped, _facts(), metrics={"val_acc": 0.75}, epoch=3)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
        header = f.metadata()
    assert header["val_acc"] == "0.75" and header["global_batch_size"] == "8"
    # The old top-level keys stay, for readers of files written before `preprocessing`.
    assert json.loads(header["mean"]) == [0.5, 0.4, 0.3] and header["image_size"] == "16"
    loaded = load_classifier(path)
    assert loaded.preprocessing == _facts().preprocessing
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))


def test_compile_prefix_inside_a_key_is_removed_too():
    # torch.compile of a submodule puts _orig_mod. mid-key.
    assert list(bare_keys({"module.backbone._orig_mod.conv.weight": torch.zeros(1)})) == ["backbone.conv.weight"]
    with pytest.raises(UsageError, match="same weight"):
        bare_keys({"a.weight": torch.zeros(1), "_orig_mod.a.weight": torch.zeros(1)})


def _old_file(path, state, augment):
    """A checkpoint as written before preprocessing was recorded and prefixes were removed."""
    config = Config()
    config.data.augment = augment
    metadata = {"format": "imgtrain/classifier-v1", "model_name": "tiny_cnn", "head": json.dumps(HeadSpec().to_dict()),
                "class_names": json.dumps(CLASSES), "mean": "[0.5, 0.4, 0.3]", "std": "[0.2, 0.2, 0.2]",
                "image_size": "16", "crop_pct": "0.875", "config": json.dumps(config.to_dict()),
                "metrics": json.dumps({"val_acc": 0.5}), "epoch": "2", "runtime": "{}", "val_acc": "0.5"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("augment,crop_mode", [("standard", "center"), ("crop", "center"), ("stretch", "squash"),
                                               ("square", "border")])
def test_a_file_written_before_this_version_loads_with_its_runs_eval_geometry(tmp_path, augment, crop_mode):
    model = _model()
    compiled_keys = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    path = _old_file(tmp_path / "old.safetensors", compiled_keys, augment)
    meta = read_metadata(path)
    assert meta["preprocessing"]["crop_mode"] == crop_mode
    loaded = load_classifier(path)
    assert loaded.preprocessing == Preprocessing(16, 0.875, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), crop_mode)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))


def test_a_file_that_does_not_fit_the_model_is_one_usage_error(tmp_path):
    state = _model().state_dict()
    state.pop(next(iter(state)))
    path = _old_file(tmp_path / "old.safetensors", state, "standard")
    with pytest.raises(UsageError, match="does not fit tiny_cnn with 3 classes .* missing"):
        load_classifier(path)


def test_config_from_dict_ignores_unknown_keys_and_keeps_defaults():
    tables = Config().to_dict()
    tables["data"] |= {"augment": "square", "a_key_from_another_version": 1}
    tables["gone_section"] = {"x": 1}
    del tables["optim"]["lr"]
    cfg = config_from_dict(tables)
    assert cfg.data.augment == "square" and cfg.optim.lr == Config().optim.lr
    assert config_from_dict({}) == Config()
