"""The ``self_correction_*`` keys: train on states the model's own sampler visits."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ...config.base import Section


class SelfCorrectionConfig(Section):
    """Self-correction (training on the model's own rolled-out states)"""

    self_correction_enabled: bool = False
    """Every self_correction_every steps, part of the batch is not trained at the data noised at t but at the state
    the current model's sampler reaches from it a little later (t' < t, no gradient), against the flow target that
    leads from that state back to the same clean latents (docs/enhancements.md)."""
    self_correction_every: int = Field(1, ge=1)
    """Roll out on every N-th optimiser step (the other steps train as without the feature)."""
    self_correction_batch_ratio: float = Field(0.25, gt=0.0, le=1.0)
    """The fraction of each micro-batch rolled out (at least one item; the first items of the batch, which the
    data loader shuffles)."""
    self_correction_rollout_steps: int = Field(2, ge=1)
    """Euler steps of the sampler (one model call each, no gradient) from t to t'."""
    self_correction_rollout_span: float = Field(0.2, gt=0.0, lt=1.0)
    """How far the rollout goes: t' = (1 - span) * t."""
    self_correction_min_t: float = Field(0.1, gt=0.0, lt=1.0)
    """Items drawn at t below this are not rolled out (the target divides by t')."""

    def config_problems(self, cfg: Any) -> list[str]:
        fields = type(self).model_fields
        set_keys = sorted(k for k in self.model_fields_set if k != "self_correction_enabled"
                          and getattr(self, k) != fields[k].default)
        if set_keys and not self.self_correction_enabled:
            return [f"`{set_keys[0]}` is set but `self_correction_enabled` is false; set self_correction_enabled = "
                    "true or remove the self_correction_* keys"]
        return []


SECTION = SelfCorrectionConfig
