"""Backbones behind one naming scheme, with head replacement and local weights (freezing: models.finetune).

The names below are imported on first use (PEP 562): `import models.finetune` to check a config,
or `models.registry`, must not import torch, which `models.build` does. `MODELS` comes through
`models.build`, so that our own models are registered in it by the time anyone reads it.
"""

import importlib

_OWNER = {name: "models.build" for name in (
    "BuiltModel", "HeadSpec", "MODELS", "available_models", "build_classifier", "check_model_name",
    "count_parameters", "enable_grad_checkpointing", "find_classifier", "read_state_dict", "set_train_mode",
)}
_OWNER["Registry"] = "models.registry"

__all__ = sorted(_OWNER)


def __getattr__(name: str):
    if name not in _OWNER:
        # AttributeError, not ImportError: `from models import simple_cnn` then imports the submodule.
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNER[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OWNER))
