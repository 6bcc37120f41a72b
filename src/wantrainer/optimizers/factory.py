"""Optimiser factory: a known name or a dotted class path, plus "key=value" literal arguments."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable
from typing import Any

import torch

from ..common.logger import get_logger
from ..config.training import OptimizerConfig
from ..errors import UserError

logger = get_logger(__name__)

KNOWN_OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion")


def parse_optimizer_args(args: list[str]) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=(0.9, 0.99)"]`` -> dict. Values are Python literals (never eval)."""
    parsed: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"optimizer_args: {arg!r} must look like key=value, e.g. \"weight_decay=0.01\"")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(
                f"optimizer_args: {key} = {value!r} is not a Python literal (numbers, True/False, tuples, "
                "quoted strings)"
            ) from None
    return parsed


def _lazy_import(module: str, extra: str, optimizer_type: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a library that fails at import on this machine
        raise UserError(
            f"optimizer_type = {optimizer_type!r} needs the {module} package, which is not usable here ({exc}); "
            f"install it with: pip install {extra}"
        ) from None


def resolve_optimizer_class(optimizer_type: str, kwargs: dict[str, Any]) -> type[torch.optim.Optimizer]:
    """The optimiser class for ``optimizer_type``; may add default kwargs (adafactor)."""
    name = optimizer_type.lower()
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        bnb = _lazy_import("bitsandbytes", "bitsandbytes", optimizer_type)
        if not torch.cuda.is_available():
            raise UserError("optimizer_type = \"adamw8bit\" (bitsandbytes) needs a CUDA GPU; use \"adamw\" here")
        return bnb.optim.AdamW8bit
    if name == "adafactor":
        from transformers.optimization import Adafactor

        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
        return Adafactor
    if name == "prodigy":
        return _lazy_import("prodigyopt", "prodigyopt", optimizer_type).Prodigy
    if name == "lion":
        if hasattr(torch.optim, "Lion"):
            return torch.optim.Lion
        return _lazy_import("lion_pytorch", "lion-pytorch", optimizer_type).Lion
    if "." not in optimizer_type:
        raise UserError(
            f"optimizer_type = {optimizer_type!r} is unknown; use one of {', '.join(KNOWN_OPTIMIZERS)} "
            "or a dotted class path such as \"torch.optim.SGD\""
        )
    module_name, _, class_name = optimizer_type.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"optimizer_type = {optimizer_type!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"optimizer_type = {optimizer_type!r} is not a torch.optim.Optimizer subclass")
    return cls


def check_optimizer_config(cfg: OptimizerConfig) -> None:
    """The optimiser checks that need no parameters (``validate`` runs them too): type, args, schedule name."""
    from .schedulers import SCHEDULES

    resolve_optimizer_class(cfg.optimizer_type, parse_optimizer_args(cfg.optimizer_args))
    if cfg.lr_scheduler not in SCHEDULES:
        raise UserError(f"lr_scheduler = {cfg.lr_scheduler!r} is unknown; use one of {', '.join(SCHEDULES)}")


def create_optimizer(cfg: OptimizerConfig, param_groups: Iterable) -> torch.optim.Optimizer:
    """Build the optimiser for ``param_groups`` (groups may carry their own ``lr``, e.g. LoRA+)."""
    kwargs = parse_optimizer_args(cfg.optimizer_args)
    cls = resolve_optimizer_class(cfg.optimizer_type, kwargs)
    lr: float | None = cfg.learning_rate
    if cls.__name__ == "Adafactor" and kwargs.get("relative_step"):
        lr = None  # Adafactor computes its own step size; an explicit lr is an error there
        param_groups = list(param_groups)
        if len({g.get("lr") for g in param_groups if isinstance(g, dict)}) > 1:
            raise UserError(
                "optimizer_args relative_step=True: Adafactor computes one step size for every parameter, so "
                "per-group learning rates (loraplus_lr_ratio) cannot be honoured; remove one of them"
            )
        param_groups = [{k: v for k, v in g.items() if k != "lr"} if isinstance(g, dict) else g for g in param_groups]
    try:
        optimizer = cls(param_groups, lr=lr, **kwargs)
    except TypeError as exc:
        raise UserError(f"optimizer_args {sorted(kwargs)} do not fit {cls.__module__}.{cls.__name__}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"optimizer {cls.__name__}: {exc} (check learning_rate and optimizer_args)") from None
    logger.info("Optimizer: %s.%s lr=%s %s", cls.__module__, cls.__name__, lr, kwargs or "")
    return optimizer
