"""Storage of the DiT block Linear weights in another dtype than the compute dtype (``dit_weight_dtype``).

``fp8``: the weight is stored as float8_e4m3fn (a plain cast, clamped to the fp8 range).
``fp8_scaled``: the weight is divided by a per-output-channel scale (``amax / 448``) before the cast; the scale is
a float32 buffer named ``scale_weight`` (so ``state_dict()`` round-trips, as in scaled-fp8 checkpoint files).
``bf16`` / ``fp16`` / ``fp32``: the weight is kept in that dtype. Each layer upcasts at compute time into a
scratch buffer the model shares (see ``stored_linear.py``). Norms, embeddings, the head and the modulation
tables are never stored this way: they are in the compute dtype (float32 for the precision-sensitive ones).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .stored_linear import FP8_DTYPE, FP8_DTYPES, FP8_MAX, StoredLinear, UpcastBuffers

# Linear layers inside each block that are stored in fp8 (relative to ``blocks.N``); the image-branch
# projections ``cross_attn.k_img`` / ``v_img`` (Wan 2.1 I2V / FLF2V) too when the model has them.
FP8_BLOCK_LINEARS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + (
    "ffn.0",
    "ffn.2",
    "cross_attn.k_img",
    "cross_attn.v_img",
)


class FP8Linear(StoredLinear):
    """A ``StoredLinear`` whose weight is float8_e4m3fn (optionally with a per-output-channel ``scale_weight``)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, scaled: bool = False, device=None
    ):
        super().__init__(in_features, out_features, bias, storage_dtype=FP8_DTYPE, scaled=scaled, device=device)


def quantize_weight(weight: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, in] weight -> (fp8 weight, float32 scale [out] or None)."""
    w = weight.float()
    if not scaled:
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def is_fp8_block_linear(key: str) -> bool:
    """True for ``blocks.N.<linear>.weight`` keys of the layers that fp8 (and any other weight storage) applies to."""
    parts = key.split(".")
    return (
        len(parts) >= 4
        and parts[0] == "blocks"
        and parts[-1] == "weight"
        and ".".join(parts[2:-1]) in FP8_BLOCK_LINEARS
    )


def _make_stored(old: nn.Linear, storage_dtype: torch.dtype, scaled: bool) -> StoredLinear:
    device = old.weight.device
    if storage_dtype in FP8_DTYPES:
        new = FP8Linear(old.in_features, old.out_features, old.bias is not None, scaled=scaled, device=device)
    else:
        new = StoredLinear(old.in_features, old.out_features, old.bias is not None, storage_dtype=storage_dtype,
                           device=device)  # fmt: skip
    if device.type != "meta":
        with torch.no_grad():
            if storage_dtype in FP8_DTYPES:
                weight, scale = quantize_weight(old.weight, scaled)
                new.weight.data = weight
                if scale is not None:
                    new.scale_weight.copy_(scale)
            else:
                new.weight.data = old.weight.data.to(storage_dtype)
            if old.bias is not None:
                new.bias.data = old.bias.data
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def store_block_linears(model: nn.Module, storage_dtype: torch.dtype, scaled: bool = False) -> list[str]:
    """Swap the block Linear modules of ``model`` for ``StoredLinear`` ones keeping the weight in
    ``storage_dtype`` (fp8: quantised, with per-channel scales if ``scaled``); all share ``model.upcast_buffers``.

    Works on a real model (converts its weights) and on a meta-device one (the weights are loaded after).
    Returns the names of the replaced modules.
    """
    buffers = getattr(model, "upcast_buffers", None)
    if buffers is None:
        buffers = UpcastBuffers()
        model.upcast_buffers = buffers
    replaced = []
    for index, block in enumerate(model.blocks):
        for name in FP8_BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
            if old is None or isinstance(old, StoredLinear):  # no image branch / already stored
                continue
            new = _make_stored(old, storage_dtype, scaled)
            new.upcast_buffers = buffers
            if child.isdigit():
                parent[int(child)] = new
            else:
                setattr(parent, child, new)
            replaced.append(f"blocks.{index}.{name}")
    return replaced


def replace_block_linears(model: nn.Module, scaled: bool) -> list[str]:
    """fp8 storage of the block Linears (``store_block_linears`` with float8_e4m3fn)."""
    return store_block_linears(model, FP8_DTYPE, scaled)


__all__ = ["FP8Linear", "FP8_BLOCK_LINEARS", "FP8_DTYPE", "FP8_DTYPES", "FP8_MAX", "StoredLinear",
           "is_fp8_block_linear", "quantize_weight", "replace_block_linears", "store_block_linears"]  # fmt: skip
