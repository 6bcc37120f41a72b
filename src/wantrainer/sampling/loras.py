"""LoRA files for standalone sampling: which file goes to which expert, and applying one to a DiT.

A file is applied through a ``LoRANetwork`` built to its own shape (rank from the tensors, the modules it
names), so any LoRA that ``networks.formats.load_lora`` reads works, whatever ``network_dim`` the config
says. With bf16 / fp32 base weights the update is merged (no extra cost per step); fp8 base weights keep the
LoRA as a wrapper around each Linear, and so do weights stored apart from the compute dtype (dit_weight_dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common.logger import get_logger
from ..errors import UserError

logger = get_logger(__name__)

HIGH_SUFFIX = "_high_noise"
LOW_SUFFIX = "_low_noise"


def assign_loras(paths: list[Path], two_experts: bool) -> dict[str, Path | None]:
    """Map ``--lora`` files to experts: ``{"high": ..., "low": ...}`` (wan21 uses only ``"low"``).

    One file serves every expert. Two files (wan22 only) are matched by the ``_high_noise`` / ``_low_noise``
    stem suffix; without suffixes the first is the high-noise LoRA and the second the low-noise one.
    """
    if not paths:
        return {"high": None, "low": None}
    if len(paths) == 1:
        return {"high": paths[0], "low": paths[0]}
    if not two_experts or len(paths) > 2:
        raise UserError(
            f"--lora was given {len(paths)} times; use one file, or two for wan22 "
            "(the high-noise and the low-noise LoRA)"
        )
    high = [p for p in paths if p.stem.endswith(HIGH_SUFFIX)]
    low = [p for p in paths if p.stem.endswith(LOW_SUFFIX)]
    if len(high) == 1 and len(low) == 1:
        return {"high": high[0], "low": low[0]}
    if high or low:
        raise UserError(
            f"cannot tell which --lora is for which expert: {', '.join(p.name for p in paths)}; name them "
            f"*{HIGH_SUFFIX}.safetensors and *{LOW_SUFFIX}.safetensors, or give them in the order high, low"
        )
    logger.info("--lora without expert suffixes: %s -> high-noise, %s -> low-noise", paths[0].name, paths[1].name)
    return {"high": paths[0], "low": paths[1]}


def apply_lora_file(
    dit: nn.Module, path: Path, multiplier: float, device: torch.device | str | None = None
) -> nn.Module:
    """Apply the LoRA in ``path`` to ``dit`` at ``multiplier``; returns the ``LoRANetwork`` used.

    A wrapped LoRA (fp8 base) keeps its small tensors on ``device`` (the compute device; default: where the
    DiT is now), so it stays in place while an offloaded expert moves between the CPU and the GPU.
    """
    from ..networks.formats import load_lora
    from ..networks.lora_wan import LoRANetwork

    if not Path(path).is_file():
        raise UserError(f"--lora: file not found: {path}")
    sd, _ = load_lora(path)
    network = LoRANetwork.from_state_dict(dit, sd, multiplier, source=str(path))
    network.eval()
    from ..models.wan.stored_linear import StoredLinear

    if any(isinstance(m, StoredLinear) for m in dit.modules()):  # fp8 / bf16 storage: merging would round
        network.to(device=device if device is not None else dit.device)
        network.apply_to(dit)
        logger.info("LoRA %s applied to %d stored (fp8 / bf16) Linear(s) at multiplier %g", Path(path).name, len(network.module_paths), multiplier)
    else:
        network.to(device=dit.device)
        network.merge_to(dit)
        logger.info("LoRA %s merged into %d Linear(s) at multiplier %g", Path(path).name, len(network.module_paths), multiplier)
    return network
