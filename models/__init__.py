"""Backbones behind one naming scheme, with head replacement, local weights and freezing."""

from models.build import (
    BuiltModel,
    HeadSpec,
    available_models,
    build_classifier,
    check_model_name,
    count_parameters,
    find_classifier,
    freeze,
    read_state_dict,
    set_train_mode,
)
from models.registry import MODELS, Registry

__all__ = [
    "BuiltModel", "HeadSpec", "MODELS", "Registry", "available_models", "build_classifier",
    "check_model_name", "count_parameters", "find_classifier", "freeze", "read_state_dict",
    "set_train_mode",
]
