"""Per-sample loss weights as a function of the flow-matching time ``t`` (= sigma) in (0, 1).

- ``none``: 1
- ``sigma_sqrt``: ``sigma**-2`` (SD3; sigma floored at 1e-3, the smallest sigma of a 1000-step schedule)
- ``cosmap``: ``2 / (pi * (1 - 2 sigma + 2 sigma**2))`` (SD3)
- ``logit_normal`` / ``mode``: the density of the SD3 logit-normal / mode timestep distribution at
  ``t``. Multiplying the loss by it is importance weighting: with uniformly drawn ``t`` the expected
  loss equals the expected loss under that distribution (the densities integrate to 1).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap", "logit_normal", "mode")

SIGMA_FLOOR = 1e-3
# The mode map u -> t is monotonic (a valid distribution) only for mode_scale below 1 / (pi/2 - 1).
MODE_SCALE_MAX = 1.0 / (math.pi / 2.0 - 1.0)


def logit_normal_density(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Density of ``sigmoid(N(mean, std))`` at ``t``."""
    logit = torch.log(t) - torch.log1p(-t)
    gauss = torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2.0 * math.pi))
    return gauss / (t * (1.0 - t))


def _mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)


def mode_density(t: torch.Tensor, scale: float, iters: int = 50) -> torch.Tensor:
    """Density of the SD3 "mode" distribution ``t = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, u ~ U(0, 1).

    The map is decreasing from 1 to 0, so ``u(t)`` is found by bisection and the density is
    ``1 / |dt/du|`` there.
    """
    if not -1.0 < scale < MODE_SCALE_MAX:
        raise UserError(f"mode_scale = {scale} gives no valid distribution; use a value in (-1, {MODE_SCALE_MAX:.3f})")
    t64 = t.double()
    lo, hi = torch.zeros_like(t64), torch.ones_like(t64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = _mode_map(mid, scale) > t64  # still left of the solution (map is decreasing)
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    u = (lo + hi) / 2
    slope = -1.0 - scale + scale * (math.pi / 2.0) * torch.sin(math.pi * u)
    return (1.0 / slope.abs()).to(t.dtype)


def timestep_weight(
    scheme: str, t: torch.Tensor, *, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> torch.Tensor:
    """Loss weight ``[B]`` for times ``t`` ``[B]`` (float32)."""
    t = t.float()
    if scheme == "none":
        return torch.ones_like(t)
    if scheme == "sigma_sqrt":
        return t.clamp_min(SIGMA_FLOOR) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t * t))
    if scheme == "logit_normal":
        return logit_normal_density(t, logit_mean, logit_std)
    if scheme == "mode":
        return mode_density(t, mode_scale)
    raise ValueError(f"unknown weighting_scheme {scheme!r}; choose one of {', '.join(WEIGHTING_SCHEMES)}")
