"""``network_module`` and ``network_args``: which adapter to build, parsed once for ``train`` and ``validate``.

Two module names, as users of kohya's sd-scripts / musubi-tuner write them:

- ``networks.lora_wan`` (also ``networks.lora``): LoRA; ``network_args`` ``include_patterns``,
  ``exclude_patterns``, ``verbose``, ``dora_wd`` (DoRA).
- ``lycoris.kohya``: ``algo = "lora" | "locon" | "loha" | "lokr"`` (default ``"lora"``; ``locon`` is LoRA, the DiT
  blocks have no convolutions), ``factor`` (LoKr), ``full_matrix`` (LoKr), ``dora_wd`` and the same
  include / exclude / verbose keys.

The parse needs no torch, so the config check (``validate``) and ``train`` refuse exactly the same things.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

LORA_MODULES = ("networks.lora_wan", "wantrainer.networks.lora_wan", "networks.lora")
LYCORIS_MODULES = ("lycoris.kohya",)
FULL_MODULES = ("full",)
NETWORK_MODULES = LORA_MODULES + LYCORIS_MODULES + FULL_MODULES
ALGOS = ("lora", "locon", "loha", "lokr")
COMMON_KEYS = ("include_patterns", "exclude_patterns", "verbose", "dora_wd")
LYCORIS_KEYS = COMMON_KEYS + ("algo", "factor", "full_matrix")
CONV_KEYS = ("conv_dim", "conv_alpha", "conv_block_dims", "conv_block_alphas", "use_tucker")
"""LyCORIS options for convolution layers; the Wan DiT blocks have none, so they are refused with that reason."""
TOP_LEVEL_KEYS = ("network_dim", "network_alpha", "network_dropout", "rank_dropout", "module_dropout",
                  "loraplus_lr_ratio", "use_rslora", "network_weights", "save_precision", "dual_lora_mode")


@dataclass(frozen=True)
class NetworkSpec:
    """The parsed adapter choice: ``algo`` is ``"lora"``, ``"loha"``, ``"lokr"`` or ``"full"`` (full fine-tuning)."""

    algo: str = "lora"
    dora_wd: bool = False
    factor: int = -1
    full_matrix: bool = False
    include_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    verbose: bool = False


def _literal(value: str) -> Any:
    """A Python literal, or the bare word itself (``algo=lokr``, as kohya's parser accepts); each key's own check
    then says what it expects."""
    try:
        with warnings.catch_warnings():  # "blocks\.3" in a Python string: an invalid escape, kept as written
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"network_args: {key} must be True or False, got {value!r}")


def _raw_args(module: str, args: list[str]) -> dict[str, Any]:
    allowed = LYCORIS_KEYS if module in LYCORIS_MODULES else COMMON_KEYS
    parsed: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if sep and key in TOP_LEVEL_KEYS:
            raise UserError(f"network_args: {key} is a top-level key; write `{key} = {value.strip()}` instead")
        if sep and key in CONV_KEYS and module in LYCORIS_MODULES:
            raise UserError(f"network_args: {key} configures convolution layers; the Wan DiT blocks have none "
                            "(only Linear layers are adapted), remove it")
        if not sep or key not in allowed:
            choices = ", ".join(k + "=..." for k in allowed)
            raise UserError(f'network_args: {arg!r} is not one of {choices} (network_module = "{module}")')
        parsed[key] = _literal(value.strip())
    return parsed


def parse_network_args(module: str, args: list[str]) -> NetworkSpec:
    """``network_module`` + ``network_args`` -> ``NetworkSpec``; a ``UserError`` names the bad key."""
    if module not in NETWORK_MODULES:
        names = ", ".join(f'"{m}"' for m in ("networks.lora_wan", "lycoris.kohya", "full"))
        raise UserError(f"network_module = {module!r} is not available; use one of {names}")
    if module in FULL_MODULES:
        if args:
            raise UserError('network_args have no effect with network_module = "full" (it trains the DiT\'s own '
                            "weights); choose them with trainable_blocks, or remove network_args")
        return NetworkSpec(algo="full")
    raw = _raw_args(module, args)
    for key in ("include_patterns", "exclude_patterns"):
        value = raw.get(key, [])
        if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
            raise UserError(f"network_args: {key} must be a list of regex strings, e.g. {key}=['blocks\\.0\\..*']")
        raw[key] = list(value)
    algo = str(raw.get("algo", "lora")).lower()
    if algo not in ALGOS:
        raise UserError(f"network_args: algo = {algo!r} is not available; use one of {', '.join(ALGOS)}")
    factor = raw.get("factor", -1)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0 or factor < -1:
        raise UserError(f"network_args: factor must be a positive integer (or -1 for the most square split), "
                        f"got {factor!r}")
    if algo != "lokr" and ("factor" in raw or "full_matrix" in raw):
        raise UserError(f"network_args: factor / full_matrix are LoKr options; they have no effect with algo={algo}")
    return NetworkSpec(
        algo="lora" if algo == "locon" else algo,
        dora_wd=_bool("dora_wd", raw.get("dora_wd", False)),
        factor=factor,
        full_matrix=_bool("full_matrix", raw.get("full_matrix", False)),
        include_patterns=raw["include_patterns"],
        exclude_patterns=raw["exclude_patterns"],
        verbose=_bool("verbose", raw.get("verbose", False)),
    )


def network_problems(cfg: Any) -> list[str]:
    """Every problem with the network section (``cfg``: a ``NetworkConfig``) that ``train`` would refuse."""
    try:
        spec = parse_network_args(cfg.network_module, cfg.network_args)
    except UserError as exc:
        return [str(exc)]
    if spec.algo == "full" or cfg.network_module in FULL_MODULES:
        return full_network_problems(cfg)
    problems = [f"`{key}` is only read with network_module = \"full\"; remove it or set that module"
                for key in FULL_KEYS if getattr(cfg, key) != type(cfg).model_fields[key].get_default(call_default_factory=True)]
    if spec.algo != "lora" and cfg.loraplus_lr_ratio is not None:
        problems.append(f"`loraplus_lr_ratio` is a LoRA option (faster lora_up); algo={spec.algo} has no up matrix: "
                        "remove it")
    if spec.algo != "lora" and cfg.use_rslora:
        problems.append(f"`use_rslora` is a LoRA option; algo={spec.algo} scales by alpha / rank: remove it")
    if spec.algo != "lora" or spec.dora_wd:
        what = "DoRA (dora_wd)" if spec.dora_wd else f"algo={spec.algo}"
        for key in ("network_dropout", "rank_dropout"):
            if getattr(cfg, key) is not None:
                problems.append(f"`{key}` is not available with {what}; use `module_dropout` or remove it")
    return problems


FULL_KEYS = ("trainable_blocks", "full_save_precision", "full_save_comfyui_prefix")
ADAPTER_KEYS = ("network_dim", "network_alpha", "network_dropout", "network_weights", "use_rslora", "rank_dropout",
                "module_dropout", "loraplus_lr_ratio", "save_precision", "dual_lora_mode")
"""Options of the adapters that a full fine-tune never reads."""


def full_network_problems(cfg: Any) -> list[str]:
    """The network section with ``network_module = "full"``: no adapter options, valid regexes."""
    import re

    problems = []
    for key in ADAPTER_KEYS:
        if getattr(cfg, key) != type(cfg).model_fields[key].get_default(call_default_factory=True):
            problems.append(f'`{key}` is an adapter option; network_module = "full" trains the DiT itself: remove it')
    for pattern in cfg.trainable_blocks:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"`trainable_blocks`: bad regex {pattern!r}: {exc}")
    return problems


def full_model_problems(model_cfg: Any, network_cfg: Any) -> list[str]:
    """Model options a full fine-tune cannot honour (it trains and optimises the weights in place)."""
    if network_cfg.network_module not in FULL_MODULES:
        return []
    problems = []
    if model_cfg.weight_dtype in ("fp8", "fp8_scaled"):
        key = "fp8_base" if model_cfg.fp8_base else "fp8_scaled" if model_cfg.fp8_scaled else "dit_weight_dtype"
        problems.append(f'`{key}` (fp8 weights) cannot be trained: network_module = "full" needs bf16 / fp16 / fp32 '
                        'weights; remove it (save an fp8 file with full_save_precision = "fp8_scaled")')
    elif model_cfg.dit_weight_dtype != "auto":
        problems.append(f'`dit_weight_dtype` = "{model_cfg.dit_weight_dtype}": network_module = "full" trains the '
                        'weights in the compute dtype (mixed_precision); remove it')
    if model_cfg.blocks_to_swap:
        problems.append('`blocks_to_swap` is not available with network_module = "full" (the optimiser holds every '
                        "trained weight on the device); set it to 0 and use gradient_checkpointing")
    return problems


FSDP_OPTIMIZERS = ("adamw", "torch.optim.adamw", "torch.optim.adam", "torch.optim.sgd")
"""Optimisers whose step runs on FSDP's DTensor shards (AdamW and SGD tested; Adam is AdamW's base class). Both
Adafactors (transformers' and torch.optim's) fail on them, and the others' kernels expect plain tensors or are
untested."""


def engine_problems(cfg: Any) -> list[str]:
    """``distributed_engine = "fsdp"`` with options it cannot honour (``cfg``: the whole config)."""
    if cfg.training.distributed_engine != "fsdp":
        return []
    problems = []
    if cfg.network.network_module not in FULL_MODULES:
        problems.append('`distributed_engine = "fsdp"` shards a full fine-tune: set network_module = "full", or use '
                        'distributed_engine = "ddp" for an adapter (LoRA, LoHa, LoKr, DoRA)')
    optimizer = cfg.optimizer.optimizer_type
    if optimizer.lower() not in FSDP_OPTIMIZERS:
        problems.append(f'`optimizer_type` = "{optimizer}" is not available with distributed_engine = "fsdp" (its '
                        'step does not run on sharded DTensor parameters); use "adamw" (or "torch.optim.SGD" / '
                        '"torch.optim.Adam")')
    return problems
