"""Training timestep samplers for flow matching.

Convention: ``noisy = (1 - t) * x0 + t * noise``, ``target = noise - x0``, model timestep ``1000 * t``.
Every sampler returns ``t`` as float32 ``[B]`` in the open interval (0, 1). ``min_timestep`` /
``max_timestep`` (0..1000) rescale the draw linearly into ``[min/1000, max/1000]``, so the shape of
the distribution is kept (no rejection sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config.training import TimestepConfig
from ..errors import UserError

# Flux's resolution-dependent shift: mu is a linear function of the image token count,
# (256 tokens -> 0.5, 4096 tokens -> 1.15), shift = exp(mu).
FLUX_SHIFT_POINTS = ((256.0, 0.5), (4096.0, 1.15))

# qinglong: a per-sample mixture of three draws (as in musubi-tuner): 80 % flux_shift,
# 7.5 % logsnr(logit_mean, logit_std), 12.5 % logsnr(5.36, 1.0) (a low-noise-heavy component).
QINGLONG_WEIGHTS = (0.80, 0.075, 0.125)
QINGLONG_LOGSNR2 = (5.36, 1.0)

# Keep t strictly inside (0, 1): t = 0 (clean) or 1 (pure noise) gives degenerate weightings.
_EPS = 1e-5

SAMPLERS = ("uniform", "sigmoid", "shift", "logsnr", "qinglong", "flux_shift", "logit_normal")


def flux_shift_for_seq_len(seq_len: int) -> float:
    """The Flux time shift ``exp(mu)`` for an image of ``seq_len`` tokens (per frame)."""
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    mu = y1 + (y2 - y1) * (float(seq_len) - x1) / (x2 - x1)
    return math.exp(mu)


def apply_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift ``t' = shift * t / (1 + (shift - 1) * t)`` (shift > 1: noisier)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class TimestepSampler:
    """Draws training timesteps ``t`` in (0, 1); see the module docstring for the convention."""

    method: str = "shift"
    discrete_flow_shift: float = 3.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: int | None = None
    max_timestep: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"unknown timestep_sampling {self.method!r}; choose one of {', '.join(SAMPLERS)}")
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(
                f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep}), "
                "both within 0..1000"
            )

    @classmethod
    def from_config(cls, cfg: TimestepConfig) -> TimestepSampler:
        return cls(
            method=cfg.timestep_sampling,
            discrete_flow_shift=cfg.discrete_flow_shift,
            sigmoid_scale=cfg.sigmoid_scale,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            min_timestep=cfg.min_timestep,
            max_timestep=cfg.max_timestep,
        )

    @property
    def t_range(self) -> tuple[float, float]:
        """(lowest, highest) t after the min/max_timestep constraint."""
        lo = 0.0 if self.min_timestep is None else self.min_timestep / 1000.0
        hi = 1.0 if self.max_timestep is None else self.max_timestep / 1000.0
        return lo, hi

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Draw ``t`` float32 ``[batch_size]`` in (0, 1).

        ``seq_len`` is the token count of one latent frame (``(H/2) * (W/2)`` for the 1x2x2 patch);
        flux_shift and qinglong need it. Draws happen on the generator's device (CPU by default) and
        are then moved to ``device``, so a seeded run gives the same timesteps on any accelerator.
        """
        if self.method in ("flux_shift", "qinglong") and seq_len is None:
            raise ValueError(f"timestep_sampling {self.method!r} needs seq_len (tokens per latent frame)")
        t = self._draw(batch_size, generator, seq_len)
        lo, hi = self.t_range
        t = t * (hi - lo) + lo
        return t.clamp(_EPS, 1.0 - _EPS).to(device=device, dtype=torch.float32)

    # -- draws in (0, 1) before the range constraint --------------------------------------------

    def _draw(self, n: int, gen: torch.Generator | None, seq_len: int | None) -> torch.Tensor:
        gen_device = gen.device if gen is not None else "cpu"

        def randn(k: int) -> torch.Tensor:
            return torch.randn(k, generator=gen, device=gen_device, dtype=torch.float64)

        def rand(k: int) -> torch.Tensor:
            return torch.rand(k, generator=gen, device=gen_device, dtype=torch.float64)

        m = self.method
        if m == "uniform":
            return rand(n)
        if m == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * randn(n))
        if m == "shift":
            return apply_shift(torch.sigmoid(self.sigmoid_scale * randn(n)), self.discrete_flow_shift)
        if m == "flux_shift":
            return apply_shift(torch.sigmoid(self.sigmoid_scale * randn(n)), flux_shift_for_seq_len(seq_len))
        if m == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * randn(n))
        if m == "logsnr":
            # logSNR ~ N(mean, std); for flow matching SNR = ((1 - t) / t)^2, so t = sigmoid(-logSNR / 2).
            return torch.sigmoid(-(self.logit_mean + self.logit_std * randn(n)) / 2)
        return self._draw_qinglong(n, rand, randn, seq_len)

    def _draw_qinglong(self, n, rand, randn, seq_len: int) -> torch.Tensor:
        choice = rand(n)
        w_mid, w_snr, _ = QINGLONG_WEIGHTS
        shifted = apply_shift(torch.sigmoid(self.sigmoid_scale * randn(n)), flux_shift_for_seq_len(seq_len))
        logsnr1 = torch.sigmoid(-(self.logit_mean + self.logit_std * randn(n)) / 2)
        mean2, std2 = QINGLONG_LOGSNR2
        logsnr2 = torch.sigmoid(-(mean2 + std2 * randn(n)) / 2)
        return torch.where(choice < w_mid, shifted, torch.where(choice < w_mid + w_snr, logsnr1, logsnr2))
