"""The training loss: a sum of terms that share one call shape.

Every term is a callable ``(pred, target, batch, ctx) -> (loss scalar, metrics dict)``. The loop calls
``TrainingLoss`` exactly like a single term and never needs to know which terms are on; enhancements
add their own terms with ``add_term``.

The built-in term is the flow-matching loss: element loss (``loss_type``), times the per-element weight
``ctx.element_weight`` when there is one (the product of the enhancements' ``loss_weight`` hooks), averaged per
sample (over the elements the context's ``loss_mask`` keeps, when it has one: the TI2V-5B leaves its given first
frame out), times the timestep weight (``weighting_scheme``), times the per-sample ``batch["loss_weight"]``
(``prior_loss_weight`` for ``is_reg`` data), averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.training import LossConfig, TimestepConfig
from ..errors import UserError
from .losses import ElementLoss, element_loss
from .weighting import MODE_SCALE_MAX, timestep_weight

Metrics = dict[str, torch.Tensor]
LossTerm = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any], Any], tuple[torch.Tensor, Metrics]]


def flow_matching_pair(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input ``(1 - t) * x0 + t * noise`` and the target ``noise - x0`` for times ``t`` [B] in (0, 1)."""
    t_view = t.view(-1, *([1] * (latents.ndim - 1)))  # [B] -> [B, 1, 1, 1, 1]
    return (1.0 - t_view) * latents + t_view * noise, noise - latents


@dataclass
class LossContext:
    """What a loss term may need besides pred/target/batch. ``t``: flow-matching times ``[B]`` in (0, 1)."""

    t: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    loss_mask: torch.Tensor | None = None
    """[B, 1, F, 1, 1] (broadcast to the latents): 1 where the loss counts; None counts every element."""


def context_mask(ctx: Any) -> torch.Tensor | None:
    """``loss_mask`` of a context (None when it has none)."""
    if isinstance(ctx, Mapping):
        return ctx.get("loss_mask")
    return getattr(ctx, "loss_mask", None)


def masked_per_sample_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, ...] -> [B]``: the mean over the elements where ``mask`` (broadcast to ``x``) is 1. Masked elements are
    multiplied by 0, so they send exactly no gradient."""
    if mask is None:
        return per_sample_mean(x)
    weights = mask.to(x).expand_as(x)
    return (x * weights).reshape(x.shape[0], -1).sum(dim=1) / weights.reshape(x.shape[0], -1).sum(dim=1).clamp_min(1.0)


def context_t(ctx: Any) -> torch.Tensor:
    """``t`` from a ``LossContext`` or a mapping with key ``"t"``."""
    if isinstance(ctx, Mapping):
        return ctx["t"]
    return ctx.t


def context_element_weight(ctx: Any) -> torch.Tensor | None:
    """The per-element weight (broadcastable to the prediction) of a context, or None."""
    if isinstance(ctx, Mapping):
        return ctx.get("element_weight")
    return getattr(ctx, "element_weight", None)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


@dataclass
class FlowMatchingLoss:
    """``mean_b( loss_weight_b * w(t_b) * mean(element_weight_b * element_loss(pred_b, target_b)) )``."""

    element: ElementLoss
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __call__(self, pred, target, batch, ctx) -> tuple[torch.Tensor, Metrics]:
        pred, target = pred.float(), target.float()
        elements = self.element(pred, target)  # [B, C, F, H, W]
        element_weight = context_element_weight(ctx)
        if element_weight is not None:
            elements = elements * element_weight.to(elements)
        per_sample = masked_per_sample_mean(elements, context_mask(ctx))  # [B]
        t = context_t(ctx).to(per_sample.device)
        w_t = timestep_weight(
            self.weighting_scheme, t, logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale
        )
        sample_w = batch.get("loss_weight") if isinstance(batch, Mapping) else None
        if sample_w is None:
            sample_w = torch.ones_like(per_sample)
        loss = (per_sample * w_t * sample_w.to(per_sample)).mean()
        return loss, {"loss/flow_matching": loss.detach(), "loss/flow_matching_unweighted": per_sample.mean().detach()}


class TrainingLoss:
    """The sum of named loss terms; called like one term: ``(pred, target, batch, ctx) -> (loss, metrics)``."""

    def __init__(self, terms: dict[str, LossTerm] | None = None):
        self.terms: dict[str, LossTerm] = dict(terms or {})

    @classmethod
    def from_config(cls, loss_cfg: LossConfig, timestep_cfg: TimestepConfig) -> TrainingLoss:
        scale = timestep_cfg.mode_scale
        if timestep_cfg.weighting_scheme == "mode" and not -1.0 < scale < MODE_SCALE_MAX:
            raise UserError(f"mode_scale = {scale}: use a value in (-1, {MODE_SCALE_MAX:.3f}) with weighting_scheme = \"mode\"")
        term = FlowMatchingLoss(
            element=element_loss(loss_cfg.loss_type, loss_cfg.huber_c),
            weighting_scheme=timestep_cfg.weighting_scheme,
            logit_mean=timestep_cfg.logit_mean,
            logit_std=timestep_cfg.logit_std,
            mode_scale=scale,
        )
        return cls({"flow_matching": term})

    def add_term(self, name: str, term: LossTerm) -> None:
        if name in self.terms:
            raise ValueError(f"loss term {name!r} is already registered")
        self.terms[name] = term

    def __call__(self, pred, target, batch, ctx) -> tuple[torch.Tensor, Metrics]:
        total: torch.Tensor | None = None
        metrics: Metrics = {}
        for term in self.terms.values():
            loss, term_metrics = term(pred, target, batch, ctx)
            total = loss if total is None else total + loss
            metrics.update(term_metrics)
        if total is None:
            raise ValueError("TrainingLoss has no terms")
        metrics["loss/total"] = total.detach()
        return total, metrics
