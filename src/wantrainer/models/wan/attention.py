"""Attention backends of the Wan DiT, chosen per model (never by patching torch).

All backends take ``q`` [B, Lq, heads, head_dim] and ``k``/``v`` [B, Lk, heads, head_dim] and return
[B, Lq, heads, head_dim]. Optional packages are imported only when their backend is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wantrainer.errors import UserError

ATTN_MODES = ("sdpa", "flash_attn", "sage_attn", "xformers", "split_attn")

_PACKAGES = {
    "flash_attn": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "sage_attn": ("sageattention", "pip install sageattention"),
    "xformers": ("xformers.ops", "pip install xformers (matching your torch version)"),
}


_SAGE_INFERENCE_ONLY = (
    'attn_mode = "sage_attn" is inference only (it has no backward pass): use sdpa, flash_attn or xformers '
    "for training; sage_attn can be used for sampling."
)


def _import_backend(mode: str):
    module, hint = _PACKAGES[mode]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"attn_mode = \"{mode}\" needs the package '{module.split('.')[0]}', which is not installed "
            f'({exc}). Install it ({hint}) or use attn_mode = "sdpa".'
        ) from None


def check_attn_mode(mode: str, for_training: bool = False) -> None:
    """Raise ``UserError`` if ``mode`` is unknown, its package is not installed, or it cannot train."""
    if mode not in ATTN_MODES:
        raise UserError(f"unknown attn_mode {mode!r}: choose one of {', '.join(ATTN_MODES)}")
    if for_training and mode == "sage_attn":
        raise UserError(_SAGE_INFERENCE_ONLY)
    if mode in _PACKAGES:
        _import_backend(mode)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, heads, d] -> [B, heads, L, d] and back
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # one sample at a time: the peak attention memory is that of a single sample
    return torch.cat([_sdpa(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(q.shape[0])], dim=0)


def _require_cuda_half_precision(mode: str, q: torch.Tensor) -> None:
    """flash / sage attention kernels run on CUDA and in fp16 / bf16 only: anything else is a user error."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise UserError(
            f'attn_mode = "{mode}" computes in fp16/bf16 only, but the model computes in {q.dtype}: '
            'set mixed_precision = "bf16" (or "fp16"), or use attn_mode = "sdpa".'
        )
    if q.device.type != "cuda":
        raise UserError(
            f'attn_mode = "{mode}" runs on a CUDA GPU only, but the model is on {q.device}: use attn_mode = "sdpa".'
        )


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _require_cuda_half_precision("flash_attn", q)
    return _import_backend("flash_attn").flash_attn_func(q, k, v)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise UserError(_SAGE_INFERENCE_ONLY)
    _require_cuda_half_precision("sage_attn", q)
    return _import_backend("sage_attn").sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _import_backend("xformers").memory_efficient_attention(q, k, v)


_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": _sdpa,
    "split_attn": _split,
    "flash_attn": _flash,
    "sage_attn": _sage,
    "xformers": _xformers,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "sdpa") -> torch.Tensor:
    """Multi-head attention without mask: [B, Lq, heads, d] x [B, Lk, heads, d] -> [B, Lq, heads, d]."""
    return _BACKENDS[mode](q, k, v)
