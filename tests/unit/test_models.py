"""Backbone resolution, head replacement per family, local weights files and freezing."""

import pytest
import torch
from safetensors.torch import save_file

from models import HeadSpec, build_classifier, check_model_name, set_train_mode
from models.finetune import make_plan, prepare_for_wrapping
from models.registry import Registry
from configs.errors import UsageError

# (name, input size): the smallest member of each family the seeds use, and a few more.
FAMILIES = [
    ("simple_cnn", 32),
    ("torchvision/resnet18", 64),
    ("torchvision/regnet_y_400mf", 64),
    ("torchvision/alexnet", 64),
    ("torchvision/vgg11", 32),
    ("torchvision/efficientnet_b0", 64),
    ("torchvision/mobilenet_v3_small", 64),
    ("torchvision/convnext_tiny", 64),
    ("torchvision/vit_b_16", 224),
    ("timm/test_vit", 160),
    ("timm/test_efficientnet", 64),
    ("timm/resnet10t", 64),
]


@pytest.mark.parametrize("name, size", FAMILIES)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_is_replaced_for_the_number_of_classes(name, size, head):
    built = build_classifier(name, 7, HeadSpec(head, hidden=16, dropout=0.1))
    built.model.eval()
    with torch.no_grad():
        out = built.model(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7)
    head_module = built.model.get_submodule(built.head_name)
    last = head_module if head == "linear" else head_module[-1]
    assert isinstance(last, torch.nn.Linear) and last.out_features == 7


def test_alexnet_head_is_classifier_6():
    assert build_classifier("torchvision/alexnet", 2).head_name == "classifier.6"


@pytest.mark.parametrize("name, message", [
    ("timm/resnet18x", "unknown model 'timm/resnet18x' (not a timm model); close matches: timm/resnet18"),
    ("torchvision/resnet19", "close matches: torchvision/resnet18"),
    ("simple_cn", "close matches: simple_cnn"),
    ("torchvision/fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
])
def test_unknown_names_suggest_close_matches(name, message):
    with pytest.raises(UsageError) as err:
        check_model_name(name)
    assert message in str(err.value)


def test_registry_refuses_duplicates_and_names_itself():
    reg = Registry("widgets")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered in the widgets registry"):
        reg.register("a")(lambda: 2)
    with pytest.raises(UsageError, match="'aa' is not in the widgets registry; close matches: a"):
        reg.get("aa")


def test_file_with_original_imagenet_head_fills_backbone_and_head_starts_fresh(tmp_path):
    original = build_classifier("torchvision/resnet18", 1000).model  # same layout as the library's file
    path = tmp_path / "resnet18_imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    built = build_classifier("torchvision/resnet18", 5, weights=str(path))
    assert torch.equal(built.model.conv1.weight, original.conv1.weight)
    assert built.model.fc.out_features == 5
    assert "new head for 5 classes starts fresh" in built.notes[0]


def test_file_saved_for_the_same_classes_loads_whole(tmp_path):
    trained = build_classifier("tiny_cnn", 3).model
    path = tmp_path / "ours.pth"
    torch.save(trained.state_dict(), path)
    built = build_classifier("tiny_cnn", 3, weights=str(path))
    assert torch.equal(built.model.fc.weight, trained.fc.weight)
    assert "loaded all weights" in built.notes[0]


def test_file_for_another_architecture_names_the_differing_tensors(tmp_path):
    other = build_classifier("tiny_cnn", 3).model
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UsageError) as err:
        build_classifier("simple_cnn", 3, weights=str(path))
    assert "does not fit simple_cnn with 3 classes: features.0.weight has shape (8, 3, 3, 3) in the file" in str(err.value)


def test_freeze_backbone_keeps_weights_and_batchnorm_statistics():
    built = build_classifier("tiny_cnn", 3)
    model = built.model
    prepare_for_wrapping(model, make_plan(model, built.head_name, "backbone"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    set_train_mode(model)
    loss = model(torch.rand(4, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]  # running_mean/var and num_batches_tracked untouched


# ---- weights files that are not weights: one line saying what the file is ----

class _Pickled:  # a module-level class: torch.save pickles it by reference
    pass


def _file(tmp_path, name, content):
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path


WEIGHTS_FILES = [
    ("x.pth", b"these are not weights\n" * 10,
     "x.pth is not a readable torch weights file: it is a text file, not weights (it starts 'these are not"),
    ("x.safetensors", b"hello\n", "x.safetensors is not a readable safetensors file: it is a text file, not weights"),
    ("empty.pth", b"", "empty.pth is not a readable torch weights file: it is empty (0 bytes)"),
    ("lfs.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
     "it is a Git LFS pointer, not the weights: run `git lfs pull` where it was cloned"),
    ("page.pth", b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "it is an HTML page, not weights"),
    ("noise.pth", b"\x80\x02" + bytes(range(200, 256)) * 4,
     "noise.pth is not a readable torch weights file (damaged or another format)"),
    ("noise.safetensors", b"\xff" * 64, "noise.safetensors is not a readable safetensors file"),
    ("module.pt", lambda p: torch.save(torch.nn.Linear(2, 2), p),
     "it needs arbitrary objects unpickled (first: torch.nn.modules.linear.Linear)"),
    ("mixed.pt", lambda p: torch.save({"w": torch.zeros(2), "epoch": 3}, p), "('epoch' is a int)"),
    ("list.pt", lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state dict of tensors"),
    ("none.pt", lambda p: torch.save({}, p), "holds an empty dict"),
]


@pytest.mark.parametrize("name, content, message", WEIGHTS_FILES, ids=[w[0] for w in WEIGHTS_FILES])
def test_a_file_that_is_not_weights_is_one_line_saying_what_it_is(tmp_path, name, content, message):
    path = _file(tmp_path, name, content)
    with pytest.raises(UsageError) as caught:
        build_classifier("tiny_cnn", 3, weights=str(path))
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert str(path) in text


# ---- pretrained weights without network: one line in seconds, naming model.weights ----
# No test here reaches the network: the Hub's offline mode (HF_HUB_OFFLINE) blocks every request,
# and the reachability probe is replaced.

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _hub_unreachable(monkeypatch):
    import models.build

    probes = []
    why = "ConnectError: [Errno -2] Name or service not known"
    monkeypatch.setattr(models.build, "_hub_unreachable", lambda endpoint: probes.append(endpoint) or why)
    return probes


def test_hf_hub_offline_without_the_weights_cached_is_one_line(empty_hub_cache, monkeypatch):
    import models.build
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setattr(models.build, "_hub_unreachable", lambda endpoint: pytest.fail("no probe when offline"))
    with pytest.raises(UsageError) as caught:
        build_classifier("timm/test_vit", 3, pretrained=True)  # timm's own download path, offline
    assert str(caught.value) == (
        "could not fetch timm/test_vit's pretrained weights: HF_HUB_OFFLINE is set and the weights are not in the "
        "cache. Offline, give the weights as a file (model.weights=FILE model.pretrained=false), or set HF_HOME to a "
        "cache that holds them")


def test_an_unreachable_hub_fails_at_once_instead_of_retrying(empty_hub_cache, monkeypatch):
    import time

    import timm
    from huggingface_hub import constants

    probes = _hub_unreachable(monkeypatch)
    offline_during_download = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: (offline_during_download.append(
        constants.is_offline_mode()), create(*a, **kw))[1])
    started = time.perf_counter()
    with pytest.raises(UsageError, match=r"could not fetch timm/test_vit's pretrained weights: the Hugging Face Hub "
                                         r"\(https://huggingface.co\) did not answer \(ConnectError: \[Errno -2\] Name "
                                         r"or service not known\) and the weights are not in the cache. Offline, give "
                                         r"the weights as a file \(model.weights=FILE"):
        build_classifier("timm/test_vit", 3, pretrained=True)
    assert time.perf_counter() - started < 10  # huggingface_hub's own retries take ~50 s
    assert probes == [constants.ENDPOINT] and offline_during_download == [True]  # no request went out
    assert constants.is_offline_mode() is False  # restored


def test_an_unreachable_hub_still_loads_weights_from_the_cache(empty_hub_cache, monkeypatch):
    import timm
    from safetensors.torch import save_file

    _hub_unreachable(monkeypatch)
    reference = timm.create_model("test_vit")
    snapshot = empty_hub_cache / "models--timm--test_vit.r160_in1k"  # the Hub's cache layout
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              str(snapshot / "snapshots" / ("0" * 40) / "model.safetensors"))
    built = build_classifier("timm/test_vit", 3, pretrained=True)
    key = "patch_embed.proj.weight"
    assert torch.equal(built.model.state_dict()[key], reference.state_dict()[key])


def test_torchvision_weights_without_network_name_torch_home(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))  # nothing cached

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UsageError, match=r"could not fetch torchvision/resnet18's pretrained weights: URLError: "
                                         r"<urlopen error \[Errno -2\] Name or service not known>. Offline, give the "
                                         r"weights as a file \(model.weights=FILE model.pretrained=false\), or set "
                                         r"TORCH_HOME to a cache"):
        build_classifier("torchvision/resnet18", 3, pretrained=True)
