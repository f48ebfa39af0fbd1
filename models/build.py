"""Build a classifier by name: resolve the backbone, load weights, fit the head.

Names: `timm/<name>` goes to `timm.create_model`, `torchvision/<name>` to
`torchvision.models.get_model`, a bare name to our own registry (`models.registry.MODELS`).
The backbone is always created with its library's own head first, so that a weights file with
the original 1,000-class ImageNet head can fill it; then the head is replaced for the dataset.

Recipes that change the network itself are asked of its library: stochastic depth
(`model.drop_path_rate`: timm's `drop_path_rate`, torchvision's `stochastic_depth_prob`) at
construction, gradient checkpointing (`runtime.grad_checkpointing`) through timm's
`set_grad_checkpointing`. A model that lacks the one asked for is refused in one line rather
than trained without it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the exception only: nothing here unpickles

import torch
from torch import nn

from models import simple_cnn as _simple_cnn  # noqa: F401  (registers our models)
from models.registry import MODELS
from configs.errors import UsageError
from configs.schema import IMAGENET_MEAN, IMAGENET_STD


# Where the final Linear lives in torchvision's classification families, tried in order:
# resnet/regnet/resnext/shufflenet/googlenet: fc; alexnet/vgg/efficientnet/mobilenet/convnext/
# mnasnet/densenet: classifier (a Linear or a Sequential ending in one); vit: heads.head; swin: head.
_CLASSIFIER_PATHS = ("fc", "classifier", "heads.head", "head", "heads")


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "linear"  # "linear" or "mlp" (Linear-ReLU-Dropout-Linear, the dog-breeds seed)
    hidden: int = 512
    dropout: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BuiltModel:
    model: nn.Module
    name: str
    head_name: str  # dotted path of the classifier module inside `model`
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)  # what happened to the weights, for the log


# ----------------------------------------------------------------------------------------------
# Names


def _timm():
    import timm

    return timm


def _torchvision_classifiers() -> list[str]:
    import torchvision

    # module= keeps detection, segmentation, video and optical-flow models out.
    return torchvision.models.list_models(module=torchvision.models)


def available_models(pattern: str = "*") -> list[str]:
    """Every name `build_classifier` accepts that matches a shell-style pattern."""
    ours = [n for n in MODELS.names() if fnmatch.fnmatch(n, pattern)]
    tv = [f"torchvision/{n}" for n in _torchvision_classifiers() if fnmatch.fnmatch(f"torchvision/{n}", pattern)
          or fnmatch.fnmatch(n, pattern)]
    tm = [f"timm/{n}" for n in _timm().list_models() if fnmatch.fnmatch(f"timm/{n}", pattern)
          or fnmatch.fnmatch(n, pattern)]
    return ours + tv + tm


def _unknown(name: str, candidates: list[str], where: str) -> UsageError:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return UsageError(f"unknown model '{name}' ({where}){hint}. List names with "
                      f"`python launch/list_models.py --search 'PATTERN'`")


def check_model_name(name: str) -> None:
    """Fail early, with close matches, for a name no library knows."""
    if name.startswith("timm/"):
        timm = _timm()
        arch = timm.models.split_model_name_tag(name[5:])[0]
        if not timm.is_model(arch):
            raise _unknown(name, [f"timm/{n}" for n in timm.list_models()], "not a timm model")
    elif name.startswith("torchvision/"):
        names = _torchvision_classifiers()
        if name[12:] not in names:
            raise _unknown(name, [f"torchvision/{n}" for n in names], "not a torchvision classification model")
    elif name not in MODELS:
        everything = MODELS.names() + [f"torchvision/{n}" for n in _torchvision_classifiers()]
        everything += [f"timm/{n}" for n in _timm().list_models()]
        raise _unknown(name, everything, "use timm/<name>, torchvision/<name> or one of ours: "
                                         + ", ".join(MODELS.names()))


def _create_backbone(name: str, pretrained: bool, drop_path_rate: float = 0.0) -> nn.Module:
    check_model_name(name)
    if name.startswith(("timm/", "torchvision/")):
        try:
            return _library_model(name, pretrained, drop_path_rate)
        except OSError as e:  # no network, a proxy, a full cache disk: requests', urllib's and the Hub's errors
            if not pretrained:
                raise
            raise _no_pretrained_weights(name, e) from None
    if pretrained:
        raise UsageError(f"'{name}' has no pretrained weights; set model.pretrained = false "
                         f"or give model.weights = FILE")
    if drop_path_rate:
        raise _no_stochastic_depth(name, "our models have no residual blocks to drop")
    return MODELS.get(name)()


def _library_model(name: str, pretrained: bool, drop_path_rate: float = 0.0) -> nn.Module:
    # 0 passes nothing: the library's own default stays (torchvision's efficientnet builders use 0.2).
    key = "drop_path_rate" if name.startswith("timm/") else "stochastic_depth_prob"
    extra = {key: drop_path_rate} if drop_path_rate else {}
    try:
        if name.startswith("timm/"):
            with _hub_cache_only_when_unreachable(pretrained):
                return _timm().create_model(name[5:], pretrained=pretrained, **extra)
        import torchvision

        model = torchvision.models.get_model(name[12:], weights="DEFAULT" if pretrained else None, **extra)
    except TypeError as e:
        if extra and key in str(e):  # "unexpected keyword argument", or a builder that fixes it itself
            fixed = "its builder sets it itself" if "multiple values" in str(e) else f"it takes no {key}"
            raise _no_stochastic_depth(name, fixed) from None
        raise
    if extra and not _has_stochastic_depth(model):  # a builder that swallows unknown arguments (mobilenet_v3)
        raise _no_stochastic_depth(name, f"it ignores {key}")
    return model


def _has_stochastic_depth(model: nn.Module) -> bool:
    from torchvision.ops import StochasticDepth

    return any(isinstance(m, StochasticDepth) and m.p > 0 for m in model.modules())


def _no_stochastic_depth(name: str, why: str) -> UsageError:
    return UsageError(f"model.drop_path_rate: {name} has no stochastic depth to set ({why}); set "
                      f"model.drop_path_rate=0, or use a model with it (most timm/<name> models; torchvision's "
                      f"efficientnet and convnext)")


class _HubUnreachable(OSError):
    """The Hub did not answer and the weights are not in the local cache."""


@contextlib.contextmanager
def _hub_cache_only_when_unreachable(pretrained: bool):
    """Without network, huggingface_hub retries each file timm asks for 5 times with backoff:
    ~50 s of "Retrying" lines before the same answer. One quick request says whether the Hub
    answers; when it does not, timm's download runs in the Hub's offline mode (HF_HUB_OFFLINE), so
    weights already in the cache still load and missing ones fail at once."""
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if not pretrained or constants is None or constants.is_offline_mode():
        yield
        return
    why = _hub_unreachable(constants.ENDPOINT)
    if not why:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except OSError as e:
        raise _HubUnreachable(f"the Hugging Face Hub ({constants.ENDPOINT}) did not answer ({why}) and the "
                              f"weights are not in the cache") from e
    finally:
        constants.HF_HUB_OFFLINE = False


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str:
    """'' when the Hub answers one request (any HTTP status) within `timeout` s, else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, proxy, TLS: each means no download
        return f"{type(e).__name__}: {_first_line(e)}"
    return ""


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _no_pretrained_weights(name: str, e: OSError) -> UsageError:
    if isinstance(e, _HubUnreachable):
        why = str(e)
    elif name.startswith("timm/") and _hub_offline():
        why = "HF_HUB_OFFLINE is set and the weights are not in the cache"
    else:
        why = f"{type(e).__name__}: {_first_line(e)}"
    cache = "HF_HOME" if name.startswith("timm/") else "TORCH_HOME"
    return UsageError(f"could not fetch {name}'s pretrained weights: {why}. Offline, give the weights as a file "
                      f"(model.weights=FILE model.pretrained=false), or set {cache} to a cache that holds them")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return constants.is_offline_mode()


def normalization_of(name: str, model: nn.Module) -> tuple[tuple, tuple]:
    """Mean and std the backbone was pretrained with; ImageNet's when it does not say."""
    cfg = getattr(model, "pretrained_cfg", None)  # timm
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if hasattr(model, "default_mean"):  # ours
        return tuple(model.default_mean), tuple(model.default_std)
    return IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------------------------
# Heads


def find_classifier(model: nn.Module) -> str:
    """Dotted path of the module that produces the logits."""
    if hasattr(model, "get_classifier"):  # timm
        target = model.get_classifier()
        for path, module in model.named_modules():
            if module is target:
                return path
    for path in _CLASSIFIER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return path
        if isinstance(module, nn.Sequential):
            linears = [i for i, m in enumerate(module) if isinstance(m, nn.Linear)]
            if linears:
                return f"{path}.{linears[-1]}"
    raise UsageError(f"cannot find a Linear classifier in {type(model).__name__}; "
                     f"this architecture is not supported for head replacement")


def _new_head(in_features: int, num_classes: int, spec: HeadSpec) -> nn.Module:
    if spec.kind == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, spec.hidden), nn.ReLU(inplace=True), nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden, num_classes),
    )


def replace_head(model: nn.Module, num_classes: int, spec: HeadSpec) -> str:
    """Give the model a fresh head for `num_classes`; returns the head's dotted path."""
    if hasattr(model, "reset_classifier"):  # timm keeps num_classes and its pools consistent
        model.reset_classifier(num_classes)
        if spec.kind == "linear":
            return find_classifier(model)
    path = find_classifier(model)
    old = model.get_submodule(path)
    model.set_submodule(path, _new_head(old.in_features, num_classes, spec))
    return path


# ----------------------------------------------------------------------------------------------
# Weights files


def bare_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under the bare model's key names. torch.compile puts `_orig_mod.` before the
    keys of whatever it compiled (the whole model, or a submodule: then mid-key); DDP and
    DataParallel put `module.` in front. Either order of the two wrappers is undone."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        bare = key.replace("_orig_mod.", "").removeprefix("module.")
        if bare in out:
            raise UsageError(f"state dict keys {bare!r} and {key!r} are the same weight once wrapper prefixes "
                             f"are removed")
        out[bare] = value
    return out


_WEIGHTS_HINT = "give model.weights a .safetensors file or a torch.save(model.state_dict(), FILE) file"


def _not_weights(path: Path) -> str:
    """Why the first bytes of `path` say it is no weights file at all, or ''."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: run `git lfs pull` where it was cloned"
    if b"<html" in head.lower() or b"<!doctype" in head.lower():
        return "it is an HTML page, not weights (a download that saved a web page?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the 512th byte
            return ""
        text = head[:e.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it is a text file, not weights (it starts {text.strip()[:40]!r})"
    return ""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict; never unpickles objects."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"model.weights {path} is a folder; give the weights file in it (.safetensors, or a "
                         f"torch.save(model.state_dict(), FILE) file)")
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    why = _not_weights(path)
    if why:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch weights"
        raise UsageError(f"model.weights {path} is not a readable {kind} file: {why}; {_WEIGHTS_HINT}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"model.weights {path} is not a readable safetensors file ({_first_line(e)}): damaged "
                             f"or another format; {_WEIGHTS_HINT}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except UnpicklingError as e:
            # torch's weights-only reader names the first class it would have to import to go on.
            needs = re.search(r"GLOBAL ([\w.]+)", str(e))
            if needs:
                raise UsageError(f"refusing model.weights {path}: it needs arbitrary objects unpickled (first: "
                                 f"{needs[1]}), which can run code. Save only the state_dict (torch.save("
                                 f"model.state_dict(), ...)) or convert it to .safetensors") from None
            raise UsageError(f"model.weights {path} is not a readable torch weights file (damaged or another "
                             f"format); {_WEIGHTS_HINT}") from None
        except Exception as e:  # noqa: BLE001 - torch's legacy reader fails on foreign bytes with any error type
            raise UsageError(f"model.weights {path} is not a readable torch weights file ({type(e).__name__}: "
                             f"{_first_line(e)}); {_WEIGHTS_HINT}") from None
        for wrapper in ("state_dict", "model", "model_state_dict"):  # common checkpoint dicts
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not state:
            what = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
            raise UsageError(f"model.weights {path} holds {what}, not a state dict of tensors; {_WEIGHTS_HINT}")
        other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if other is not None:
            raise UsageError(f"model.weights {path} is not a state dict of tensors ({other!r} is a "
                             f"{type(state[other]).__name__}); {_WEIGHTS_HINT}")
    return bare_keys(state)


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 3) -> str:
    """'' when the two state dicts have the same keys and shapes, else the first differences."""
    problems = []
    for key, tensor in expected.items():
        if key not in found:
            problems.append(f"{key} missing")
        elif tuple(found[key].shape) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(found[key].shape)} in the file, "
                            f"{tuple(tensor.shape)} in the model")
    problems += [f"{key} unexpected" for key in found if key not in expected]
    if not problems:
        return ""
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _load_weights(model: nn.Module, name: str, path: str, num_classes: int, spec: HeadSpec) -> tuple[str, str]:
    """Load a local file into `model` (which still has its library head). Returns (head path, note)."""
    state = read_state_dict(path)
    if not state_dict_mismatch(model.state_dict(), state):
        model.load_state_dict(state)
        head = replace_head(model, num_classes, spec)
        return head, f"loaded backbone from {path}; its original head was replaced, new head for {num_classes} classes starts fresh"
    head = replace_head(model, num_classes, spec)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise UsageError(f"weights file {path} does not fit {name} with {num_classes} classes: {problem}")
    model.load_state_dict(state)
    return head, f"loaded all weights (backbone and head) from {path}"


# ----------------------------------------------------------------------------------------------
# The whole build


def build_classifier(name: str, num_classes: int, head: HeadSpec = HeadSpec(), pretrained: bool = False,
                     weights: str = "", drop_path_rate: float = 0.0) -> BuiltModel:
    """`drop_path_rate`: stochastic depth, passed to the library when not 0 (model.drop_path_rate)."""
    model = _create_backbone(name, pretrained, drop_path_rate)
    mean, std = normalization_of(name, model)
    notes = []
    if weights:
        head_name, note = _load_weights(model, name, weights, num_classes, head)
        notes.append(note)
    else:
        head_name = replace_head(model, num_classes, head)
        if pretrained:
            notes.append(f"loaded {name}'s pretrained weights; new head for {num_classes} classes starts fresh")
    return BuiltModel(model=model, name=name, head_name=head_name, mean=mean, std=std, notes=notes)


def enable_grad_checkpointing(built: BuiltModel) -> None:
    """runtime.grad_checkpointing: activations are recomputed in the backward pass instead of kept
    (timm's checkpoint_seq over the blocks); only timm models offer it."""
    fix = "set runtime.grad_checkpointing=false or use a timm/<name> model"
    if not hasattr(built.model, "set_grad_checkpointing"):
        raise UsageError(f"runtime.grad_checkpointing: {built.name} cannot recompute its activations (only timm "
                         f"models have set_grad_checkpointing); {fix}")
    try:
        built.model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as e:  # timm's way of saying a family lacks it
        raise UsageError(f"runtime.grad_checkpointing: {built.name} does not support gradient checkpointing"
                         f"{f' ({e})' if str(e) else ''}; {fix}") from None


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that BatchNorm layers whose parameters are all frozen stay in eval.

    A frozen BatchNorm in train mode would still normalize with batch statistics and overwrite
    its running statistics, so "frozen" would not be frozen. Deriving this from requires_grad
    keeps it right when layers are unfrozen later.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
