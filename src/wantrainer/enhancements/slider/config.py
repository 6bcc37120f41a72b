"""The ``slider_*`` keys and ``[[slider_pairs]]``: a concept slider LoRA trained from prompt pairs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...config.base import Section


class SliderPair(Section):
    target: str = Field(examples=["a person"])
    """The prompt the slider edits (the LoRA's prediction on it is trained)."""
    positive: str = Field(examples=["a person, smiling, happy"])
    """The direction at multiplier +1."""
    negative: str = Field(examples=["a person, frowning, sad"])
    """The direction at multiplier -1."""
    neutral: str | None = Field(None, examples=["a person"])
    """The base the target moves from (default: the target prompt itself, the paper's objective)."""


class SliderConfig(Section):
    """Concept slider"""

    slider_pairs: list[SliderPair] = Field(default_factory=list)
    """Concept slider training: a LoRA whose multiplier (ComfyUI's strength) moves the target prompt's prediction
    toward positive (+1) or negative (-1). One table per concept pair; the steps cycle through them. The
    dataset loss is off in a slider run."""
    slider_guidance_strength: float = Field(3.0, gt=0.0)
    """eta: how far the target moves along (positive - negative) per unit of multiplier."""
    slider_latents: Literal["dataset", "noise"] = "dataset"
    """What the slider trains on: the dataset's latents noised at the sampled timestep, or Gaussian noise in their
    place (no image content; the dataset then only gives the shapes)."""

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        fields = type(self).model_fields
        changed = sorted(k for k in ("slider_guidance_strength", "slider_latents")
                         if getattr(self, k) != fields[k].default)
        if changed and not self.slider_pairs:
            problems.append(f"`{changed[0]}` is set but there is no [[slider_pairs]] table; add one or remove it")
        for i, pair in enumerate(self.slider_pairs):
            if pair.positive.strip() == pair.negative.strip():
                problems.append(f"`slider_pairs` entry {i + 1}: positive and negative are the same prompt, so there "
                                "is no direction; give two different prompts")
        if self.slider_pairs and cfg.network.network_module == "full":
            problems.append('`slider_pairs` trains a LoRA whose multiplier is the slider; network_module = "full" '
                            "has none: use a LoRA-family network_module")
        return problems


SECTION = SliderConfig
