"""Masked training with prior preservation: the loss weighted by each item's mask, the base model kept outside it.

The masks are the datasets' ``mask_directory`` files, cached at latent resolution by ``cache-latents``
(``dataset.masks``: the first frame alone, then groups of 4 frames, 8 x 8 pixels per cell; a cell's value ``m`` is
the fraction of its pixels to learn). With ``u = unmasked_weight`` and ``p = masked_prior_preservation_weight``
the loss of one micro-batch is

    L = FM(pred, target; element weight m + (1 - m) u)  +  p FM(pred, prior; element weight 1 - m)

where ``FM`` is the run's own flow-matching criterion (its ``loss_type``, timestep weighting and per-item
``loss_weight``) and ``prior`` the base model's prediction on the same noisy input, timestep and caption with
the LoRA switched off (one extra no-grad forward, only for micro-batches with something outside the mask). A
mask of ones gives ``m + 0 u = 1`` and no prior term: exactly the unmasked loss. The first term is the seed
system's ``use_masked_training_with_prior`` masking for binary masks (it clamps grey values to
``max(m, u)``; here they mix linearly); its prior term is kohya's: the prediction pulled towards the base model's
outside the mask. Batches of datasets without masks train unmasked. With ``normalize_masked_area_loss`` each
item's element weights are divided by their mean (the seed system's option of that name), so the loss is the
mean over the learnt area rather than over the frame.
"""

from __future__ import annotations

from typing import Any

import torch

from ...criteria.training_loss import TrainingLoss
from ...dataset.cache_format import MASK_STEM_SUFFIX
from ...errors import UserError
from ..base import BaseEnhancement, ItemCache, RunContext, StepContext
from ..registry import register
from .config import MaskedTrainingConfig

MASK = "mask"
"""The per-item cache's name in ``batch["item_extras"]``."""


def _has_masks(spec: Any) -> bool:
    return spec.mask_directory is not None


@register("masked_training")
class MaskedTraining(BaseEnhancement):
    def __init__(self, section: MaskedTrainingConfig, prior_criterion: Any):
        self.unmasked_weight = float(section.unmasked_weight)
        self.prior_weight = float(section.masked_prior_preservation_weight)
        self.normalize = bool(section.normalize_masked_area_loss)
        self.prior_criterion = prior_criterion
        """The run's flow-matching term, evaluated against the base prediction for the prior term."""
        self._metric_step = -1
        self._sums: dict[str, float] = {}
        self._count = 0

    @classmethod
    def from_config(cls, cfg: Any) -> MaskedTraining | None:
        section: MaskedTrainingConfig = cfg.masked_training
        if not section.use_masked_training_with_prior:
            return None
        criterion = TrainingLoss.from_config(cfg.loss, cfg.timesteps).terms["flow_matching"]
        return cls(section, criterion)

    def item_caches(self) -> list[ItemCache]:
        return [ItemCache(MASK, MASK_STEM_SUFFIX, missing="skip", datasets=_has_masks)]

    def setup_hooks(self, run: RunContext) -> None:
        if self.prior_weight > 0:
            unable = [name for name, net in run.networks.items() if not hasattr(net, "network_disabled")]
            if unable or not run.networks:
                raise UserError("`masked_prior_preservation_weight` needs the base model's prediction, which this "
                                "network cannot give (a full fine-tune has no adapter to switch off): set it to 0 "
                                "or train a LoRA-family network_module")

    def _mask(self, ctx: StepContext) -> torch.Tensor | None:
        """The micro-batch's masks as [B, 1, F, H, W] (None: a batch without masks)."""
        masks = ctx.item_extra(MASK)
        if masks is None:
            return None
        if isinstance(masks, list):
            if all(m is None for m in masks):
                return None
            ones = torch.ones(ctx.pred.shape[2:], device=ctx.pred.device)
            masks = torch.stack([ones if m is None else m.to(ones) for m in masks])
        masks = masks.to(ctx.pred.device, torch.float32)
        if masks.shape[1:] != ctx.pred.shape[2:]:
            raise ValueError(f"mask {tuple(masks.shape)} does not fit the prediction {tuple(ctx.pred.shape)}")
        return masks.unsqueeze(1)

    def loss_weight(self, ctx: StepContext) -> torch.Tensor | None:
        mask = self._mask(ctx)
        if mask is None:
            return None
        self._note(ctx.step, "coverage", float(mask.mean()))
        return self._normalized(mask + (1.0 - mask) * self.unmasked_weight)

    def _normalized(self, weight: torch.Tensor) -> torch.Tensor:
        """With ``normalize_masked_area_loss``: each item's weight divided by its mean (the loss of the weighted
        elements averaged over the weighted area, not the whole frame)."""
        if not self.normalize:
            return weight
        area = weight.mean(dim=tuple(range(1, weight.ndim)), keepdim=True)
        return weight / area.clamp_min(1e-8)

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        if self.prior_weight <= 0:
            return None, {}
        mask = self._mask(ctx)
        if mask is None or not bool((mask < 1).any()):
            return None, {}
        with torch.no_grad(), ctx.network_disabled():
            prior = ctx.predict()
        outside = self._normalized(1.0 - mask)
        term, _ = self.prior_criterion(ctx.pred, prior, ctx.batch, {"t": ctx.t, "element_weight": outside})
        self._note(ctx.step, "prior_loss", float(term.detach()))
        return self.prior_weight * term, {}

    def _note(self, step: int, key: str, value: float) -> None:
        if step != self._metric_step:
            self._metric_step, self._sums, self._count = step, {}, 0
        if key == "coverage":
            self._count += 1
        self._sums[key] = self._sums.get(key, 0.0) + value

    def get_masked_training_metrics(self) -> dict[str, float]:
        """Mean mask coverage (fraction learnt) and prior term of the last step's micro-batches."""
        if not self._count:
            return {}
        return {key: value / self._count for key, value in self._sums.items()}
