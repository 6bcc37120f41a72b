"""The ``self_correction_*`` keys: train on states the model's own sampler visits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...config.base import Section


class SelfCorrectionConfig(Section):
    """Self-correction (training on the model's own rolled-out states)"""

    self_correction_enabled: bool = False
    """Every self_correction_every steps, part of the batch is not trained at the data noised at t but at the state
    the current model's sampler reaches from it a little later (t' < t, no gradient), against the flow target that
    leads from that state back to the same clean latents (docs/enhancements.md)."""
    self_correction_variant: Literal["rollout", "generated"] = "rollout"
    """"rollout": train part of the batch at the sampler's state a little later than t (below). "generated": every
    self_correction_every steps, generate short clips with the current model into a small cache in the output
    folder and mix them into later batches as clean latents with the prompt that made them (text-to-video models
    with one DiT only; docs/enhancements.md)."""
    self_correction_every: int = Field(1, ge=1)
    """Roll out (variant "rollout") or generate clips (variant "generated") on every N-th optimiser step (the
    other steps train as without the feature, apart from the mixed-in clips)."""
    self_correction_batch_ratio: float = Field(0.25, gt=0.0, le=1.0)
    """The fraction of each micro-batch rolled out, or replaced by cached clips of the same shape (at least one
    item; the first items of the batch, which the data loader shuffles)."""
    self_correction_rollout_steps: int = Field(2, ge=1)
    """Euler steps of the sampler (one model call each, no gradient) from t to t'."""
    self_correction_rollout_span: float = Field(0.2, gt=0.0, lt=1.0)
    """How far the rollout goes: t' = (1 - span) * t."""
    self_correction_min_t: float = Field(0.1, gt=0.0, lt=1.0)
    """Items drawn at t below this are not rolled out (the target divides by t')."""

    self_correction_cache_size: int = Field(8, ge=1)
    """Variant "generated": clips kept in {output_dir}/self_correction_cache (the oldest replaced)."""
    self_correction_clip_len: int = Field(8, ge=1)
    """Variant "generated": the most latent frames a clip has; clips are generated at the batch's bucket size, so
    batches with more latent frames generate none."""
    self_correction_sample_steps: int = Field(8, ge=1)
    """Variant "generated": Euler steps of the sampler per clip (flow shift 5, as the sample prompts' default)."""
    self_correction_guidance_scale: float = Field(1.0, ge=1.0)
    """Variant "generated": classifier-free guidance scale against the empty prompt (cached by cache-text;
    1.0: no negative pass)."""

    def config_problems(self, cfg: Any) -> list[str]:
        fields = type(self).model_fields
        set_keys = sorted(k for k in self.model_fields_set if k != "self_correction_enabled"
                          and getattr(self, k) != fields[k].default)
        if set_keys and not self.self_correction_enabled:
            return [f"`{set_keys[0]}` is set but `self_correction_enabled` is false; set self_correction_enabled = "
                    "true or remove the self_correction_* keys"]
        generated = ("self_correction_cache_size", "self_correction_clip_len", "self_correction_sample_steps",
                     "self_correction_guidance_scale")
        rollout = ("self_correction_rollout_steps", "self_correction_rollout_span", "self_correction_min_t")
        unused = rollout if self.self_correction_variant == "generated" else generated
        wrong = [k for k in set_keys if k in unused]
        if wrong:
            return [f"`{wrong[0]}` does not apply to self_correction_variant = \"{self.self_correction_variant}\"; "
                    "remove it or change the variant"]
        return []


SECTION = SelfCorrectionConfig
