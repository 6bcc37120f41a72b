"""``wantrainer sample --config X [--lora F ...] [--multiplier M] [--prompt TEXT ...] [--output-dir D]``.

Generates the config's ``[[sample_prompts]]`` (or the ``--prompt`` texts) without training: encode the prompts
(text encoder loaded, used, freed), load the DiT (wan22: both experts) with the LoRA(s), denoise, free the DiT,
decode with the VAE and write ``{name}_m{multiplier}_p{index:02d}_s{seed}.mp4`` / ``.png`` (``{name}`` is the
LoRA's name; without a LoRA, ``output_name`` and no multiplier).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common.logger import get_logger
from ..errors import UserError
from .generate import ExpertSwitch, ModelFn
from .loras import assign_loras
from .pipeline import (
    compute_dtype,
    decode_and_write,
    dit_model_fn,
    encode_sample_prompts,
    free_memory,
    generate_all_latents,
)

logger = get_logger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedExperts:
    """The DiT(s) for sampling: ``low`` is ``dit`` (the only one for wan21), ``high`` the wan22 high-noise one."""

    low: nn.Module
    high: nn.Module | None = None
    networks: list[nn.Module] = field(default_factory=list)

    def models(self) -> list[nn.Module]:
        return [m for m in (self.high, self.low) if m is not None]


def load_dit_for_sampling(model_cfg, path: Path, device: torch.device, resident: bool) -> nn.Module:
    """Load one DiT in the compute dtype; ``resident`` puts it on ``device`` now (else it stays on the CPU)."""
    from ..models.wan.loading import load_wan_dit

    if not Path(path).exists():  # a file, a shard index or a folder of shards
        raise UserError(f"DiT checkpoint not found: {path}")
    dtype = compute_dtype(model_cfg.mixed_precision, device)
    dit = load_wan_dit(
        path, device="cpu", dtype=dtype, weight_dtype=model_cfg.weight_dtype, attn_mode=model_cfg.attn_mode,
    )  # fmt: skip
    dit.eval().requires_grad_(False)
    if model_cfg.fp8_matmul:
        from ..core.wan_network_trainer import enable_fp8_matmul

        enable_fp8_matmul(dit, device)
    if model_cfg.blocks_to_swap and device.type == "cuda":
        dit.enable_block_swap(model_cfg.blocks_to_swap, device)
    if resident:
        place_dit(dit, device)
    return dit


def place_dit(dit: nn.Module, device: torch.device) -> None:
    """Move a DiT to ``device`` (with block swap: all but the swapped blocks)."""
    if dit.block_swapper is not None:
        dit.move_to_device_except_swap_blocks(device)
    else:
        dit.to(device)


def load_experts(model_cfg, loras: list[Path], multiplier: float, device: torch.device) -> LoadedExperts:
    """Load the DiT(s) named by the model section and apply the ``--lora`` files to the matching expert."""
    from .loras import apply_lora_file

    if model_cfg.dit is None:
        raise UserError("`dit` is not set: the sampling DiT checkpoint is needed")
    two = model_cfg.target_model == "wan22" and model_cfg.dit_high_noise is not None
    from ..models.wan.conditioning import run_model_type

    if model_cfg.target_model == "wan22" and not two and run_model_type(model_cfg) != "ti2v":
        logger.warning("wan22 without `dit_high_noise`: the low-noise expert `dit` serves every step")
    offload = two and model_cfg.offload_inactive_dit and device.type == "cuda"
    assigned = assign_loras(loras, two)
    experts = LoadedExperts(low=load_dit_for_sampling(model_cfg, model_cfg.dit, device, resident=not offload))
    if two:
        experts.high = load_dit_for_sampling(model_cfg, model_cfg.dit_high_noise, device, resident=not offload)
    for name, dit in (("low", experts.low), ("high", experts.high)):
        if dit is not None and assigned[name] is not None:
            experts.networks.append(apply_lora_file(dit, assigned[name], multiplier, device))
    return experts


def experts_model_fn(experts: LoadedExperts, model_cfg, device: torch.device) -> ModelFn:
    """One ``ModelFn`` over the loaded DiT(s); wan22 switches at ``timestep_boundary``."""
    if experts.high is None:
        return dit_model_fn(experts.low)
    offload = model_cfg.offload_inactive_dit and device.type == "cuda"

    def on_switch(name: str) -> None:
        if not offload:
            return
        active, inactive = (experts.high, experts.low) if name == "high" else (experts.low, experts.high)
        inactive.to("cpu")
        free_memory(device)
        place_dit(active, device)

    from ..core.experts import normalise_boundary

    return ExpertSwitch(
        high=dit_model_fn(experts.high),
        low=dit_model_fn(experts.low),
        boundary=normalise_boundary(model_cfg.timestep_boundary, experts.low.config.model_type) * 1000.0,
        on_switch=on_switch,
    )


def output_name(cfg, loras: list[Path]) -> str:
    """The LoRA's stem (without an expert suffix) when one name fits, else ``output_name``."""
    stems = {p.stem.removesuffix("_high_noise").removesuffix("_low_noise") for p in loras}
    return stems.pop() if len(stems) == 1 else cfg.saving.output_name


def _note_cpu_settings(model_cfg) -> None:
    """Say which GPU-memory settings have no effect when everything runs on the CPU."""
    unused = [f"mixed_precision = \"{model_cfg.mixed_precision}\" (computing in fp32: a half-precision matmul "
              "is far slower on the CPU)"] if model_cfg.mixed_precision != "no" else []
    if model_cfg.blocks_to_swap:
        unused.append("blocks_to_swap (the whole model is already in CPU memory)")
    if model_cfg.target_model == "wan22" and model_cfg.offload_inactive_dit:
        unused.append("offload_inactive_dit (both experts are already in CPU memory)")
    if unused:
        logger.warning("no CUDA device: sampling on the CPU; not applied: %s", "; ".join(unused))


def with_cli_images(prompts: list, image: str | None, last_image: str | None) -> list:
    """The prompts with ``--image`` / ``--last-image`` as every prompt's `image` / `last_image`."""
    changes = {k: Path(v).expanduser().resolve() for k, v in (("image", image), ("last_image", last_image)) if v}
    return [p.model_copy(update=changes) for p in prompts] if changes else prompts


def prompts_to_render(cfg, texts: list[str] | None) -> list:
    """The config's [[sample_prompts]], or one per ``--prompt`` text with the first table's other settings."""
    from ..config import SamplePrompt

    prompts = list(cfg.sampling.sample_prompts)
    if texts:
        template = prompts[0] if prompts else SamplePrompt(text="")
        return [template.model_copy(update={"text": text}) for text in texts]
    if not prompts:
        raise UserError(f"{cfg.config_path}: no [[sample_prompts]] to generate; add at least one table with "
                        '`text`, or give --prompt "..."')
    return prompts


def sample_name(cfg, loras: list[Path], multiplier: float) -> str:
    """File-name stem of the samples: the LoRA's name and its multiplier (``my_lora_m0.75``), or the base name."""
    name = output_name(cfg, loras)
    return f"{name}_m{multiplier:g}" if loras else name


def run(args: argparse.Namespace) -> int:
    from ..config_parser import load_config_for_command

    cfg = load_config_for_command(args)
    prompts = prompts_to_render(cfg, args.prompt)
    prompts = with_cli_images(prompts, getattr(args, "image", None), getattr(args, "last_image", None))
    loras = [Path(p).expanduser() for p in (args.lora or [])]
    device = default_device()
    if device.type == "cpu":
        _note_cpu_settings(cfg.model)
    out_dir = Path(args.output_dir).expanduser() if args.output_dir else cfg.saving.output_dir / "sample"

    from ..models.wan.conditioning import run_model_type
    from .conditioning import encode_sample_conditions

    model_type = run_model_type(cfg.model)
    embeds = encode_sample_prompts(cfg.model, prompts, device)
    conditions = encode_sample_conditions(cfg.model, model_type, prompts, device)
    experts = load_experts(cfg.model, loras, args.multiplier, device)
    with torch.no_grad():
        latents = generate_all_latents(experts_model_fn(experts, cfg.model, device), prompts, embeds, device,
                                       conditions, latent_space=(48, 16) if model_type == "ti2v" else (16, 8))
    del experts
    free_memory(device)
    results = decode_and_write(latents, prompts, cfg.model.vae, device, out_dir, sample_name(cfg, loras, args.multiplier),
                               step=None)
    logger.info("%d sample(s) written to %s", len(results), out_dir)
    return 0
