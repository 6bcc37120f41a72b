"""Enhancements are discovered here: every sub-package of ``wantrainer.enhancements`` is a feature folder.

A feature folder ``enhancements/<feature>/`` holds

- ``config.py`` (optional): its config section, a ``Section`` subclass named by ``SECTION = MyConfig``. It must
  import without torch (the schema is read by ``validate``, the template and the UI). The registry composes
  every feature's section into the one schema (``config.FLAT_SECTIONS``), so the template, ``--help``,
  validation and the nearest-key hints know its keys; ``cfg.<feature>`` is the validated section;
- ``<feature>_helper.py``: the factory, a class registered with one line::

      @register("<feature>")
      class MyFeature(BaseEnhancement): ...

  whose ``from_config(cfg)`` returns an instance when the config turns it on, else ``None``.

Nothing else lists the features: no file outside the folder changes when one is added.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config.base import Section
    from ..config_parser import WanTrainerConfig

_PACKAGE = __name__.rsplit(".", 1)[0]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make an enhancement class available under ``name`` (its folder's name)."""

    def wrap(cls: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and _origin(existing) != _origin(cls):
            raise ValueError(f"enhancement name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _origin(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def feature_folders() -> list[str]:
    """The feature folders under ``enhancements/``, sorted by name (the order hooks run in)."""
    package = importlib.import_module(_PACKAGE)
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.ispkg
                  and not info.name.startswith("_"))


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def feature_sections() -> dict[str, type[Section]]:
    """``{feature: its config section}`` for every folder whose ``config.py`` names a ``SECTION``."""
    sections: dict[str, type[Section]] = {}
    for folder in feature_folders():
        module = _optional_module(f"{_PACKAGE}.{folder}.config")
        section = getattr(module, "SECTION", None) if module is not None else None
        if section is not None:
            sections[folder] = section
    return sections


def registered() -> dict[str, type]:
    """Every registered enhancement (the feature folders' helpers imported first), by name."""
    for folder in feature_folders():
        _optional_module(f"{_PACKAGE}.{folder}.{folder}_helper")
    return dict(_REGISTRY)


def extra_save_suffixes() -> tuple[str, ...]:
    """Every registered feature's ``save_suffixes`` (files beside a LoRA save), sorted."""
    return tuple(sorted({s for cls in registered().values() for s in getattr(cls, "save_suffixes", ())}))


def build_enhancements(cfg: WanTrainerConfig) -> list[Any]:
    """Every registered enhancement whose ``from_config`` returns an instance, in the order of their names."""
    active = []
    for _, cls in sorted(registered().items()):
        instance = cls.from_config(cfg)
        if instance is not None:
            active.append(instance)
    return active
