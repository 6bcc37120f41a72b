"""Model files and memory / precision settings (top-level keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section

AttnMode = Literal["sdpa", "flash_attn", "sage_attn", "xformers", "split_attn"]


class ModelConfig(Section):
    target_model: Literal["wan21", "wan22"] = "wan21"
    """Which Wan family the DiT belongs to: "wan21" (Wan 2.1) or "wan22" (Wan 2.2: the A14B experts, or the TI2V-5B, one model)."""
    dit: Path | None = None
    """DiT checkpoint (.safetensors, or the first shard / index json). For wan22: the low-noise expert."""
    dit_high_noise: Path | None = None
    """wan22 only: the high-noise expert checkpoint, used for timesteps at or above `timestep_boundary`."""
    vae: Path | None = None
    """Wan 2.1 VAE weights (wan_2.1_vae.safetensors or Wan2.1_VAE.pth); for the TI2V-5B the Wan 2.2 VAE (wan2.2_vae.safetensors or Wan2.2_VAE.pth)."""
    clip: Path | None = None
    """Wan 2.1 I2V / FLF2V only: the CLIP vision encoder (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, ComfyUI's clip_vision_h.safetensors or a diffusers image_encoder folder); cache-latents writes its features."""
    t5: Path | None = None
    """UMT5-XXL text encoder weights (models_t5_umt5-xxl-enc-bf16.pth or a HF / ComfyUI safetensors)."""
    t5_tokenizer: str | None = None
    """Tokenizer folder containing spiece.model (relative to the config), or a hub id such as "google/umt5-xxl"."""
    fp8_base: bool = False
    """Store the DiT block Linear weights as float8_e4m3fn and upcast them per layer at compute time."""
    fp8_scaled: bool = False
    """Store the block Linear weights in fp8 with per-output-channel scales computed at load time (implies fp8_base; more accurate than a plain cast)."""
    blocks_to_swap: int = Field(0, ge=0)
    """Number of DiT blocks kept on the CPU and moved to the GPU just ahead of use (0 = off, at most layers - 1; saves VRAM, costs speed)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    gradient_checkpointing_cpu_offload: bool = False
    """With gradient_checkpointing: keep the checkpointed block inputs on the CPU."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """Compute precision of the DiT. "no" computes in fp32 (use this on CPU)."""
    attn_mode: AttnMode = "sdpa"
    """Attention backend: sdpa (PyTorch), flash_attn, sage_attn (inference only), xformers, split_attn."""
    timestep_boundary: float | None = Field(None, gt=0)
    """wan22: timestep where the experts switch, as 875 or 0.875 (default: 875 for T2V A14B, 900 for I2V A14B, as the reference)."""
    offload_inactive_dit: bool = True
    """wan22: keep the expert that is not in use on the CPU."""
    ti2v_image_ratio: float | None = Field(None, ge=0, le=1)
    """TI2V-5B only: share of the video items trained as image-to-video (first latent frame clean at timestep 0, left out of the loss); the rest train as text-to-video, images always do. Unset: 0.5."""
