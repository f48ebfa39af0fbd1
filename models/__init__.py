"""Backbones behind one naming scheme, with head replacement and local weights (freezing: models.finetune)."""

from models.build import (
    BuiltModel,
    HeadSpec,
    available_models,
    build_classifier,
    check_model_name,
    count_parameters,
    enable_grad_checkpointing,
    find_classifier,
    read_state_dict,
    set_train_mode,
)
from models.registry import MODELS, Registry

__all__ = [
    "BuiltModel", "HeadSpec", "MODELS", "Registry", "available_models", "build_classifier",
    "check_model_name", "count_parameters", "enable_grad_checkpointing", "find_classifier", "read_state_dict",
    "set_train_mode",
]
