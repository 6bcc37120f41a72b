"""Self-correction: train on states the current model's sampler actually visits, not only on the ideal path.

On every ``self_correction_every``-th optimiser step, for the first ``ceil(self_correction_batch_ratio * B)`` items
of each micro-batch whose t is at least ``self_correction_min_t`` (the loader shuffles the batches): starting from
the data noised at t, x_t = (1 - t) x0 + t n, the current model (the trained network on, no gradient) takes
``self_correction_rollout_steps`` Euler steps of the flow ODE to t' = (1 - self_correction_rollout_span) t (not
below the boundary while the Wan 2.2 high-noise expert trains), through the project's one denoising loop
(``sampling.generate.denoise``). The item is then trained at (x~_t', t') against

    target = n~ - x0,   n~ = (x~_t' - (1 - t') x0) / t'     (equivalently (x~_t' - x0) / t')

the flow-matching velocity of the straight path from x0 through the visited state: following it from x~_t' leads
back to the same clean latents x0, and on the ideal path (x~_t' = x_t') it is the usual target n - x0. This is the
target of DREAM (Zhou et al., "DREAM: Diffusion Rectification and Estimation-Adaptive Models", CVPR 2024: the
noise re-estimated from the model's own shifted input, the clean sample kept) with a multi-step sampler rollout
in place of its one-step estimate. The drift, the RMS of x~_t' - x_t' against the data noised at t' with the
same noise, is logged as ``self_correction/drift``. The rollout draws no random numbers: which items roll out and
how far are functions of the step and the batch, so resume is exact, and steps without a rollout train exactly
as without the feature. Frames the objective keeps clean (TI2V-5B image-to-video) stay as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...sampling.generate import denoise, flow_euler_steps
from ..base import BaseEnhancement, RunContext, StepContext
from ..registry import register
from .config import SelfCorrectionConfig


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@register("self_correction")
class SelfCorrectionHelper(BaseEnhancement):
    """``self_correction_enabled``: see the module docstring."""

    def __init__(self, cfg: SelfCorrectionConfig):
        self.cfg = cfg
        self.boundary: float | None = None
        self._drifts: list[float] = []
        self._items = 0
        self.last = {"drift": 0.0, "items": 0.0}

    @classmethod
    def from_config(cls, cfg: Any) -> SelfCorrectionHelper | None:
        section: SelfCorrectionConfig = cfg.self_correction
        return cls(section) if section.self_correction_enabled else None

    def setup_hooks(self, run: RunContext) -> None:
        self.boundary = getattr(run.experts, "boundary", None)

    def rolls_out(self, step: int) -> bool:
        """Whether the optimiser step after ``step`` steps (``ctx.step``) rolls out."""
        return (step + 1) % self.cfg.self_correction_every == 0

    def chosen(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of the items rolled out: the first ceil(ratio * B) of those with t >= min_t."""
        want = max(1, math.ceil(self.cfg.self_correction_batch_ratio * t.shape[0]))
        eligible = torch.nonzero(t >= self.cfg.self_correction_min_t).flatten()
        return eligible[:want]

    def end_t(self, t: torch.Tensor, expert: str) -> torch.Tensor:
        end = (1.0 - self.cfg.self_correction_rollout_span) * t
        if expert == "high_noise" and self.boundary is not None:
            end = torch.maximum(end, torch.full_like(end, self.boundary))  # stay in the high-noise expert's range
        return end

    @torch.no_grad()
    def rollout(self, ctx: StepContext, idx: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """x~_t' of items ``idx``: the sampler's Euler steps from their x_t (in ``ctx.noisy``) to ``t_end``."""
        t_start = ctx.t[idx]
        n = self.cfg.self_correction_rollout_steps
        sigmas = torch.stack([t_start + (t_end - t_start) * (j / n) for j in range(n + 1)])  # [n + 1, k]
        per_token = ctx.timesteps.ndim == 2
        token_on = (ctx.timesteps[idx] > 0).float() if per_token else None  # 0 on a given clean first frame

        def timestep_for(sigma: torch.Tensor) -> torch.Tensor:
            return sigma[:, None] * 1000.0 * token_on if per_token else sigma * 1000.0

        conditioning = ctx.batch.get("conditioning")
        sub_cond = {k: v[idx] for k, v in conditioning.items()} if conditioning else None
        text = [ctx.batch["text_embeds"][int(i)] for i in idx]

        def model_fn(x: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
            return ctx.predict(x, timesteps=timestep, text_embeds=context, conditioning=sub_cond)

        start = ctx.noisy[idx]
        keep = None
        mask = ctx.get("loss_mask")
        if mask is not None:
            keep = mask[idx].to(start).expand_as(start)
        rolled = denoise(model_fn, start, flow_euler_steps(sigmas, timestep_for), text, keep=keep, fixed=start)
        return rolled if keep is None else (1 - keep) * start + keep * rolled

    def modify_noised(self, ctx: StepContext) -> None:
        if not self.rolls_out(ctx.step):
            return
        idx = self.chosen(ctx.t)
        if idx.numel() == 0:
            return
        t_start = ctx.t[idx].clone()
        t_end = self.end_t(t_start, ctx.expert)
        rolled = self.rollout(ctx, idx, t_end)
        x0, noise = ctx.latents[idx], ctx.noise[idx]
        view = (-1, 1, 1, 1, 1)
        ideal = (1 - t_end.view(view)) * x0 + t_end.view(view) * noise  # the data noised at t', same noise
        new_noise = (rolled - (1 - t_end.view(view)) * x0) / t_end.view(view)
        ctx.noisy, ctx.noise, ctx.target = ctx.noisy.clone(), ctx.noise.clone(), ctx.target.clone()
        ctx.t, ctx.timesteps = ctx.t.clone(), ctx.timesteps.clone()
        ctx.noisy[idx] = rolled.to(ctx.noisy.dtype)
        ctx.noise[idx] = new_noise.to(ctx.noise.dtype)
        ctx.target[idx] = (new_noise - x0).to(ctx.target.dtype)
        ctx.t[idx] = t_end
        if ctx.timesteps.ndim == 2:
            ctx.timesteps[idx] = (ctx.timesteps[idx] > 0).float() * (1000.0 * t_end[:, None])
        else:
            ctx.timesteps[idx] = 1000.0 * t_end
        ctx.extras["self_correction"] = {"index": idx, "t_start": t_start, "ideal": ideal}
        self._drifts.append(_rms(rolled - ideal))
        self._items += int(idx.numel())

    def get_self_correction_metrics(self) -> dict[str, float]:
        if self._drifts:
            self.last = {"drift": sum(self._drifts) / len(self._drifts), "items": float(self._items)}
        else:
            self.last = {"drift": self.last["drift"], "items": 0.0}
        self._drifts, self._items = [], 0
        return dict(self.last)
