"""3D rotary position embedding of the Wan DiT.

Each attention head of width ``d`` is split into three groups of channel pairs, one per axis of the patch grid
(frames, height, width): ``d - 4 * (d // 6)`` channels for time and ``2 * (d // 6)`` each for height and width,
as in the Wan reference. Pairs are adjacent channels ``(2i, 2i + 1)``. Angles are computed in float64 and the
rotation is applied in float32, whatever the compute dtype.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (time, height, width) axes of a head of width ``head_dim``."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: int, dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # [positions, dim // 2] in float64
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64, device=device), inv_freq)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, device: torch.device | str = "cpu", theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines for a (frames, height, width) patch grid: two float32 tensors [F*H*W, head_dim // 2]."""
    frames, height, width = grid
    dim_t, dim_h, dim_w = axis_dims(head_dim)
    device = torch.device(device)
    ang_t = _axis_angles(frames, dim_t, theta, device)[:, None, None, :].expand(frames, height, width, -1)
    ang_h = _axis_angles(height, dim_h, theta, device)[None, :, None, :].expand(frames, height, width, -1)
    ang_w = _axis_angles(width, dim_w, theta, device)[None, None, :, :].expand(frames, height, width, -1)
    angles = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, heads, head_dim] by the angles of ``cos``/``sin`` [L, head_dim // 2] (one table for
    the batch) or [B, L, head_dim // 2] (a table per sample, e.g. the tokens kept by TREAD routing)."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, heads, head_dim // 2] each
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
