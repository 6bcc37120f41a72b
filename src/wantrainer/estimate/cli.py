"""``wantrainer estimate --config X [--vram GB]``: peak VRAM and RAM of the run, before loading anything.

Prints each term, the totals, and with ``--vram`` the settings that make the run fit, applied one after
another in the order of their cost in speed (gradient checkpointing, fp8 weights, an 8-bit optimiser, block
inputs on the CPU, block swap, then fewer tokens).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .terms import Estimate, GiB, Knobs, ModelShapes, caching_terms, estimate, model_shapes

PRESETS = ("wan21_t2v_1.3b", "wan21_t2v_14b", "wan22_t2v_a14b", "wan22_ti2v_5b")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram", type=float, default=None, metavar="GB",
                   help="GPU memory to fit in: print the settings that make the run fit")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where the run computes (default cuda; cpu puts every term in RAM)")
    p.add_argument("--model", choices=PRESETS, default=None,
                   help="a released size instead of reading `dit` (for planning before the download)")
    p.add_argument("--resolution", default=None, metavar="WxH",
                   help="the largest bucket instead of the datasets' (e.g. 832x480)")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="frames of the longest window instead of the datasets' (1 for images)")


def _shapes_from_config(cfg: Any, knobs: Knobs, preset: str | None) -> ModelShapes:
    from ..models.wan.configs import WAN_CONFIGS
    from ..models.wan.loading import checkpoint_files, infer_wan_config, read_tensor_index

    if preset is not None:
        return model_shapes(WAN_CONFIGS[preset], cfg.network, knobs, None, preset)
    if cfg.model.dit is None or not Path(cfg.model.dit).exists():
        raise UserError("`dit` is not set or not found: set it, or give --model "
                        f"({', '.join(PRESETS)}) to estimate a released size")
    files = checkpoint_files(cfg.model.dit)
    entries = read_tensor_index(files)
    config = infer_wan_config({k: v.shape for k, v in entries.items()}, str(cfg.model.dit))
    from ..models.wan.configs import known_config_name

    size = sum(f.stat().st_size for f in files)
    return model_shapes(config, cfg.network, knobs, size, known_config_name(config) or Path(cfg.model.dit).name)


def largest_batch_tokens(cfg: Any, resolution: str | None, frames: int | None,
                         model_type: str | None = None) -> tuple[int, int, str]:  # fmt: skip
    """(tokens, batch size, description) of the largest batch of [[datasets.train]] (or the given size); the
    TI2V-5B's Wan 2.2 VAE compresses 16x, so a frame gives a quarter of the tokens. ``model_type``: a ``--model``
    preset's (default: read from `dit`)."""
    from ..dataset.blueprint import resolve_datasets
    from ..models.wan.conditioning import run_model_type
    from ..models.wan.latent_space import latent_space

    model_type = model_type or run_model_type(cfg.model)
    step = latent_space(model_type).pixel_step
    candidates = []
    specs = list(resolve_datasets(cfg.datasets, "train", model_type)) if (resolution is None or frames is None) else []
    for spec in specs:
        longest = max(spec.target_frames) if spec.frame_extraction != "full" else spec.max_frames
        candidates.append((spec.resolution, longest if spec.is_video else 1, spec.batch_size, spec.name))
    if resolution is not None or frames is not None or not candidates:
        if resolution is None and not candidates:
            raise UserError("no [[datasets.train]] to size the activations: add one or give --resolution and --frames")
        base = max(candidates, key=lambda c: _tokens(*c[:3], step)) if candidates else ((832, 480), 1, 1, "")
        size = _parse_resolution(resolution) if resolution else base[0]
        candidates = [(size, frames if frames is not None else base[1], base[2], "command line")]
    size, count, batch, name = max(candidates, key=lambda c: _tokens(*c[:3], step))
    return _tokens(size, count, batch, step), batch, f"{name}: {size[0]}x{size[1]}, {count} frame(s), batch {batch}"


def _tokens(size: tuple[int, int], frames: int, batch: int, step: int = 16) -> int:
    """Video tokens: latent frames x (H / step) x (W / step), ``step`` = VAE stride x patch 2 (32 for the TI2V-5B)."""
    latent_frames = (frames - 1) // 4 + 1
    return batch * latent_frames * (size[1] // step) * (size[0] // step)


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--resolution {text}: write it as WIDTHxHEIGHT, e.g. 832x480") from None
    return width, height


def knobs_from_config(cfg: Any, device: str, tokens: int, batch: int, experts: int) -> Knobs:
    m = cfg.model
    return Knobs(
        compute=m.mixed_precision if device == "cuda" else "no", fp8=m.weight_dtype in ("fp8", "fp8_scaled"),
        fp8_scaled=m.weight_dtype == "fp8_scaled", weight_dtype=m.weight_dtype, blocks_to_swap=m.blocks_to_swap, gradient_checkpointing=m.gradient_checkpointing,
        cpu_offload=m.gradient_checkpointing_cpu_offload, optimizer=cfg.optimizer.optimizer_type,
        experts=experts, offload_inactive=m.offload_inactive_dit, separate_loras=experts > 1
        and cfg.network.dual_lora_mode == "separate", tokens=tokens, batch=batch, device=device,
        workers=cfg.training.max_data_loader_n_workers, release_freed_memory=m.release_freed_memory,
        allocator=m.memory_allocator)


def fitting_steps(shapes_for: Callable[[Knobs], ModelShapes], knobs: Knobs,
                  budget: int) -> list[tuple[str, Estimate]]:
    """Settings changed one after another until the VRAM estimate fits ``budget`` bytes.

    ``shapes_for(knobs)`` counts the weights in the dtypes those knobs give them (fp8 halves the blocks)."""
    counted: dict[tuple[Any, ...], ModelShapes] = {}

    def shapes_of(k: Knobs) -> ModelShapes:
        key = (k.fp8, k.fp8_scaled, k.compute, k.weight_dtype)
        if key not in counted:
            counted[key] = shapes_for(k)
        return counted[key]

    def estimate_of(k: Knobs) -> Estimate:
        return estimate(shapes_of(k), k)

    steps: list[tuple[str, Estimate]] = []
    changes = [
        ("gradient_checkpointing = true", {"gradient_checkpointing": True}),
        ('dit_weight_dtype = "fp8_scaled"', {"fp8": True, "fp8_scaled": True}),
        ('optimizer_type = "adamw8bit"', {"optimizer": "adamw8bit"}),
        ("gradient_checkpointing_cpu_offload = true", {"cpu_offload": True}),
    ]
    current = knobs
    layers = shapes_of(knobs).layers
    for text, change in changes:
        if estimate_of(current).vram <= budget:
            return steps
        if all(getattr(current, k) == v for k, v in change.items()):
            continue
        if "optimizer" in change and current.optimizer.lower() not in ("adamw", "adam"):
            continue
        current = current.with_(**change)
        steps.append((text, estimate_of(current)))
    if estimate_of(current).vram <= budget:
        return steps
    for swap in range(max(current.blocks_to_swap, 1), layers):
        trial = current.with_(blocks_to_swap=swap)
        if estimate_of(trial).vram <= budget or swap == layers - 1:
            current = trial
            steps.append((f"blocks_to_swap = {swap}", estimate_of(current)))
            break
    if estimate_of(current).vram > budget:
        low, high = 1, current.tokens
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if estimate_of(current.with_(tokens=mid)).vram <= budget else (low, mid - 1)
        steps.append((f"fewer tokens per batch: at most {low} (lower resolution, frames or batch_size)",
                      estimate_of(current.with_(tokens=low))))
    return steps


def _gb(value: int) -> str:
    return f"{value / GiB:6.2f} GB"


def report(est: Estimate, header: list[str]) -> list[str]:
    gpu = est.knobs.device == "cuda"
    lines = list(header)
    lines.append(f"  {'term':<36} {'VRAM':>9} {'RAM':>9}")
    for term in est.terms:
        lines.append(f"  {term.name:<36} {_gb(term.vram) if gpu else '':>9} {_gb(term.ram):>9}  {term.note}")
    lines.append(f"  {'peak':<36} {_gb(est.vram) if gpu else '':>9} {_gb(est.ram):>9}"
                 f"  (RAM while loading the DiT: {_gb(est.load_ram).strip()})")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..config_parser import load_config_for_command

    cfg = load_config_for_command(args)
    from ..models.wan.configs import WAN_CONFIGS

    preset_type = WAN_CONFIGS[args.model].model_type if args.model else None
    tokens, batch, batch_text = largest_batch_tokens(cfg, args.resolution, args.frames, preset_type)
    two = (args.model == "wan22_t2v_a14b") if args.model else (
        cfg.model.target_model == "wan22" and cfg.model.dit_high_noise is not None)
    knobs = knobs_from_config(cfg, args.device, tokens, batch, 2 if two else 1)
    shapes = _shapes_from_config(cfg, knobs, args.model)
    est = estimate(shapes, knobs)
    header = [f"estimate for {cfg.config_path} on {args.device} ({shapes.name}, {shapes.layers} blocks, "
              f"{'two experts, ' if two else ''}largest batch {batch_text}: {tokens} tokens)"]
    print("\n".join(report(est, header)))
    for term in caching_terms(cfg.model, cfg.datasets, args.device):
        print(f"  {term.name:<36} {_gb(term.vram) if args.device == 'cuda' else '':>9} {_gb(term.ram):>9}"
              f"  {term.note} (a separate command)")
    print("These are estimates: activation and process terms are calibrated on CPU runs (docs/memory.md); "
          "measure on your GPU to be sure.")
    if args.vram is not None and args.device == "cuda":
        budget = int(args.vram * GiB)
        if est.vram <= budget:
            print(f"fits in {args.vram:g} GB as configured")
            return 0
        print(f"does not fit in {args.vram:g} GB; change, in this order:")
        for text, step in fitting_steps(lambda k: _shapes_from_config(cfg, k, args.model), knobs, budget):
            print(f"  {text:<60} -> VRAM {_gb(step.vram).strip()}, RAM {_gb(step.ram).strip()}")
    return 0
