"""A small registry for the models this project owns (the libraries keep their own).

Contract: `register(name)` decorates a factory `f(**kwargs) -> nn.Module`; registering a name
twice is an error; `get(name)` returns the factory or fails naming this registry and the closest
names. Backbones from timm and torchvision are not copied in here: they are resolved through the
libraries by prefix (see `models.build`).
"""

from __future__ import annotations

import difflib
from typing import Callable

from configs.errors import UsageError


class Registry:
    def __init__(self, name: str) -> None:
        self.name = name
        self._factories: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def decorator(factory: Callable) -> Callable:
            if name in self._factories:
                raise ValueError(f"'{name}' is already registered in the {self.name} registry")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._factories:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise UsageError(f"'{name}' is not in the {self.name} registry{hint}")
        return self._factories[name]

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def names(self) -> list[str]:
        return sorted(self._factories)


MODELS = Registry("models")
