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


def test_pretrained_weights_without_network_is_one_line_naming_model_weights(monkeypatch):
    import timm

    from configs.errors import UsageError
    from models import build_classifier

    def offline(name, pretrained=False, **kwargs):
        if pretrained:  # what huggingface_hub raises offline (a LocalEntryNotFoundError is an OSError)
            raise OSError("An error happened while trying to locate the file on the Hub\nand more lines")
        return original(name, pretrained=False, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UsageError, match=r"could not fetch timm/resnet18's pretrained weights \(OSError: An error "
                                         r"happened .*\); offline, give the weights as a file with model.weights"):
        build_classifier("timm/resnet18", 3, pretrained=True)
