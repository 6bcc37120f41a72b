"""The ``repa_*`` / ``crepa_*`` keys: align DiT hidden states with a frozen image encoder's features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from ...config.base import Section


class RepaConfig(Section):
    """REPA / CREPA representation alignment"""

    enable_repa: bool = False
    """Align the hidden states of one DiT block with a frozen image encoder's patch features (REPA): a small
    projector maps them to the encoder's width; the negative cosine similarity per token is added to the loss.
    cache-latents writes the encoder features (*_wan_wtrepa.safetensors) when this is on."""
    repa_encoder_name: str = ""
    """The frozen vision encoder: a local folder (transformers layout: config.json + weights) or a hub id already
    in the Hugging Face cache (facebook/dinov2-base, facebook/dinov2-large, ...); any AutoModel ViT backbone."""
    repa_encoder_image_size: int = Field(224, ge=14)
    """The encoder's input size: each frame is resized (aspect kept) to about this many pixels squared, each side a
    multiple of the encoder's patch size (224 -> 16 x 16 tokens with DINOv2's patch 14)."""
    repa_alignment_depth: int = Field(8, ge=0)
    """The block (0-based) whose output hidden states are aligned (REPA: about a third of the depth; the Wan
    1.3B has 30 blocks, the 14B 40)."""
    repa_loss_lambda: float = Field(0.5, ge=0.0)
    """Weight of the REPA term: loss += repa_loss_lambda * (-mean cosine similarity per token)."""
    repa_projector_hidden_dim: int = Field(2048, ge=1)
    """Width of the projector MLP's hidden layers (trained, kept in the resume state, not in the LoRA file)."""
    repa_projector_layers: int = Field(3, ge=1)
    """Linear layers of the projector MLP (SiLU between them; 1 = a single linear map)."""
    crepa_enabled: bool = False
    """CREPA: on video items each latent frame's projected tokens also align with the encoder features of the
    neighbouring frames, weighted by exp(-distance / crepa_adjacent_tau). Needs enable_repa."""
    crepa_lambda: float = Field(0.5, ge=0.0)
    """Weight of the cross-frame term: loss += crepa_lambda * (-weighted cosine with the neighbours' features)."""
    crepa_adjacent_distance: int = Field(1, ge=1)
    """The neighbour distance in latent frames (with crepa_cumulative_neighbors: every distance up to it)."""
    crepa_adjacent_tau: float = Field(1.0, gt=0.0)
    """Temperature of the distance weight exp(-d / tau)."""
    crepa_cumulative_neighbors: bool = False
    """Align with every neighbour at distance 1 .. crepa_adjacent_distance, not only at that distance."""

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        fields = type(self).model_fields
        set_keys = sorted(k for k in self.model_fields_set if k != "enable_repa"
                          and getattr(self, k) != fields[k].default)
        if set_keys and not self.enable_repa:
            problems.append(f"`{set_keys[0]}` is set but `enable_repa` is false; set enable_repa = true or remove "
                            "the repa_* / crepa_* keys")
        if self.enable_repa and not self.repa_encoder_name.strip():
            problems.append("`enable_repa` needs `repa_encoder_name`: a local folder of a vision encoder "
                            "(transformers layout) or a cached hub id such as facebook/dinov2-base")
        crepa_keys = sorted(k for k in set_keys if k.startswith("crepa_") and k != "crepa_enabled")
        if self.enable_repa and crepa_keys and not self.crepa_enabled:
            problems.append(f"`{crepa_keys[0]}` is set but `crepa_enabled` is false; set crepa_enabled = true or "
                            "remove it")
        return problems

    def command_problems(self, cfg: Any, command: str) -> list[str]:
        """cache-latents loads the encoder: its folder must exist, or its hub id be in the local cache."""
        name = self.repa_encoder_name.strip()
        if command != "cache-latents" or not self.enable_repa or not name:
            return []
        path = Path(name).expanduser()
        if path.is_dir():
            return [] if (path / "config.json").is_file() else [
                f"`repa_encoder_name` = {name!r} has no config.json: give a transformers model folder"]
        if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1:
            return [f"`repa_encoder_name` = {name!r}: no such folder; give a folder holding the encoder's "
                    "config.json and weights (e.g. a download of facebook/dinov2-base), or a cached hub id"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - transformers depends on it
            return []
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return [f"`repa_encoder_name` = {name!r} is not in the local Hugging Face cache: download it once "
                    f"(`huggingface-cli download {name}`) or set it to a local folder"]
        return []


SECTION = RepaConfig
