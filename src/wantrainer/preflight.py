"""The checks of a command that need no model weights: ``validate`` runs them for every command, and each
command runs its own before it loads anything (one function, so ``validate`` says what the command will say).

``command_problems(cfg, command)`` returns the problems for ``command`` (empty when it can start):

- every command: the keys it needs are set (``dit`` for train, ``vae`` for cache-latents, ...) and it has the
  datasets it works on;
- ``train``: the network section (``network_module``, ``network_args``), the optimiser (``optimizer_type``,
  ``optimizer_args``, ``lr_scheduler``) and the Wan 2.2 expert plan (which experts the timestep range reaches);
- every command: an enhancement section's own ``command_problems(cfg, command)`` (e.g. REPA's encoder for
  cache-latents);
- with ``scan_media``: every dataset gives at least one item (what was found, and what to change, when not).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

COMMANDS = ("cache-latents", "cache-text", "train", "sample")
_NEEDED_KEYS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "cache-latents": (("model", "vae", "the Wan VAE file"),),
    "cache-text": (("model", "t5", "the UMT5 text-encoder file"), ("model", "t5_tokenizer", "the tokenizer folder")),
    "train": (("model", "dit", "the Wan DiT checkpoint"),),
    "sample": (("model", "dit", "the Wan DiT checkpoint"), ("model", "vae", "the Wan VAE file"),
               ("model", "t5", "the UMT5 text-encoder file"), ("model", "t5_tokenizer", "the tokenizer folder")),
}


def _collect(problems: list[str], check: Callable[[], Any]) -> None:
    try:
        check()
    except UserError as exc:
        problems.append(str(exc))


def training_checks(cfg: Any) -> list[str]:
    """What ``train`` refuses before loading a model."""
    from .core.experts import plan_experts
    from .networks.args import network_problems
    from .optimizers.factory import check_optimizer_config

    problems: list[str] = list(network_problems(cfg.network))
    _collect(problems, lambda: check_optimizer_config(cfg.optimizer))
    if cfg.model.dit is not None or cfg.model.dit_high_noise is not None:
        _collect(problems, lambda: plan_experts(cfg.model, cfg.timesteps))
    if cfg.model.ti2v_image_ratio is not None and cfg.model.dit is not None and Path(cfg.model.dit).exists():
        from .criteria.objectives import objective_for
        from .models.wan.conditioning import run_model_type

        _collect(problems, lambda: objective_for(run_model_type(cfg.model), cfg.model.ti2v_image_ratio, 0))
    if cfg.model.compile_blocks:  # the compiler search only; train also compiles a tiny function first
        import torch

        from .models.wan.compile import require_compiler

        device = "cuda" if torch.cuda.is_available() else "cpu"
        _collect(problems, lambda: require_compiler(device, probe=False))
    return problems


def dataset_item_problems(cfg: Any, splits: tuple[str, ...]) -> list[str]:
    """Datasets of ``splits`` whose media give no item (scans the media: probes, no decoding of videos)."""
    from .dataset.blueprint import resolve_datasets
    from .dataset.sources import no_items_reason, scan_dataset
    from .models.wan.conditioning import run_model_type

    problems: list[str] = []
    try:
        model_type = run_model_type(cfg.model)  # the VAE of TI2V-5B changes the buckets
    except UserError:
        model_type = "t2v"  # the unreadable `dit` is reported by the model checks
    for split in splits:
        try:
            specs = resolve_datasets(cfg.datasets, split, model_type)
        except UserError as exc:
            problems.append(str(exc))
            continue
        for spec in specs:
            try:
                reason = no_items_reason(spec, scan_dataset(spec))
            except UserError as exc:
                reason = str(exc)
            if reason:
                problems.append(reason)
    return problems


def allocator_problems(model: Any) -> list[str]:
    """``memory_allocator``: its library is installed; ``release_freed_memory`` (glibc's) is not set beside it."""
    from .utils.allocator import allocator_problem

    name = model.memory_allocator
    if name == "system":
        return []
    problems = [problem] if (problem := allocator_problem(name)) else []
    if model.release_freed_memory:
        problems.append(f"release_freed_memory = true tunes glibc's allocator, which memory_allocator = \"{name}\" "
                        "replaces: drop one of the two")
    return problems


def command_problems(cfg: Any, command: str, *, scan_media: bool = False) -> list[str]:
    """Everything that stops ``command`` before it loads a model (see the module docstring)."""
    problems = [f"`{key}` is not set: point it at {what}"
                for section, key, what in _NEEDED_KEYS.get(command, ())
                if getattr(getattr(cfg, section), key) is None]
    if command in ("cache-latents", "cache-text", "train") and not cfg.datasets.train:
        problems.append("no [[datasets.train]] table: add one with a media folder (see `wantrainer config template`)")
    if command == "sample" and not cfg.sampling.sample_prompts:
        problems.append("no [[sample_prompts]] table: add one with the prompt text")
    if command == "train":
        problems += training_checks(cfg)
        problems += allocator_problems(cfg.model)
    for section in getattr(cfg, "features", {}).values():  # an enhancement's own checks of a command
        check = getattr(section, "command_problems", None)
        if check is not None:
            problems += list(check(cfg, command))
    if scan_media and command in ("cache-latents", "cache-text", "train") and cfg.datasets.train:
        problems += dataset_item_problems(cfg, ("train", "val"))
    return problems


def require_ready(cfg: Any, command: str) -> None:
    """Raise one ``UserError`` listing every problem of ``command`` (what ``validate`` reports for it)."""
    problems = command_problems(cfg, command)
    if problems:
        head = f"`{command}` cannot start ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        raise UserError("\n".join([head] + [f"  - {p}" for p in problems]))
