"""fp8 storage of the DiT block Linear weights, upcast per layer at compute time.

``fp8_base``: the weight is stored as float8_e4m3fn (a plain cast, clamped to the fp8 range).
``fp8_scaled``: the weight is divided by a per-output-channel scale (``amax / 448``) before the cast; the scale is
a float32 buffer named ``scale_weight`` (so ``state_dict()`` round-trips, as in scaled-fp8 checkpoint files).
Norms, embeddings, the head and the modulation tables are never quantised.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Linear layers inside each block that are stored in fp8 (relative to ``blocks.N``); the image-branch
# projections ``cross_attn.k_img`` / ``v_img`` (Wan 2.1 I2V / FLF2V) too when the model has them.
FP8_BLOCK_LINEARS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + (
    "ffn.0",
    "ffn.2",
    "cross_attn.k_img",
    "cross_attn.v_img",
)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in fp8 (optionally with a per-output-channel ``scale_weight``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, scaled: bool = False, device=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.requires_grad_(False)
        self.weight.data = self.weight.data.to(FP8_DTYPE)
        self.register_buffer("scale_weight", torch.ones(out_features, device=device) if scaled else None)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight upcast to ``dtype`` (times its scale)."""
        weight = self.weight.to(dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(dtype)[:, None]
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


def quantize_weight(weight: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, in] weight -> (fp8 weight, float32 scale [out] or None)."""
    w = weight.float()
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def is_fp8_block_linear(key: str) -> bool:
    """True for ``blocks.N.<linear>.weight`` keys of the layers that fp8 storage applies to."""
    parts = key.split(".")
    return (
        len(parts) >= 4
        and parts[0] == "blocks"
        and parts[-1] == "weight"
        and ".".join(parts[2:-1]) in FP8_BLOCK_LINEARS
    )


def replace_block_linears(model: nn.Module, scaled: bool) -> list[str]:
    """Swap the block Linear modules of ``model`` for ``FP8Linear`` ones (same device; weights quantised).

    Works on a real model (quantises its weights) and on a meta-device one (the weights are loaded after).
    Returns the names of the replaced modules.
    """
    replaced = []
    for index, block in enumerate(model.blocks):
        for name in FP8_BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if old is None or isinstance(old, FP8Linear):  # no image branch / already fp8
                continue
            device = old.weight.device
            new = FP8Linear(
                old.in_features, old.out_features, old.bias is not None, scaled=scaled, device=device
            )
            if device.type != "meta":
                with torch.no_grad():
                    weight, scale = quantize_weight(old.weight, scaled)
                    new.weight.data = weight
                    if scale is not None:
                        new.scale_weight.copy_(scale)
                    if old.bias is not None:
                        new.bias.data = old.bias.data
            if old.bias is not None:
                new.bias.requires_grad_(old.bias.requires_grad)
            if child.isdigit():
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
            replaced.append(f"blocks.{index}.{name}")
    return replaced
