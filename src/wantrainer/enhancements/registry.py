"""Enhancements register here by name; the builder asks the registry which ones the config turns on.

A feature folder registers itself with one line::

    @register("my_feature")
    class MyFeature(BaseEnhancement): ...

and adds its module to ``BUILTIN_MODULES`` so that it is imported before the registry is read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config_parser import WanTrainerConfig

# Modules that hold registered enhancements (imported lazily by ``build_enhancements``).
BUILTIN_MODULES: tuple[str, ...] = ()

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make an enhancement class available under ``name``."""

    def wrap(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"enhancement name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, type]:
    _import_builtins()
    return dict(_REGISTRY)


def build_enhancements(cfg: WanTrainerConfig) -> list[Any]:
    """Every registered enhancement whose ``from_config`` returns an instance, in registration order."""
    active = []
    for cls in registered().values():
        instance = cls.from_config(cfg)
        if instance is not None:
            active.append(instance)
    return active


def _import_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
