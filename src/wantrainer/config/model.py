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
    dit_weight_dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8", "fp8_scaled"] = "auto"
    """Storage dtype of the DiT block Linear weights, apart from the compute dtype (mixed_precision): "auto" = the compute dtype (as before); "bf16" / "fp16" keep them in 2 bytes and upcast each layer per call (on the CPU with mixed_precision = "no": bf16 storage, fp32 compute, half the RAM of fp32); "fp8" = float8_e4m3fn; "fp8_scaled" = fp8 with per-output-channel scales (more accurate). Norms, embeddings, head and modulation stay in the compute dtype."""
    fp8_base: bool = False
    """Older spelling of dit_weight_dtype = "fp8" (still read; do not set both)."""
    fp8_scaled: bool = False
    """Older spelling of dit_weight_dtype = "fp8_scaled" (still read, with or without fp8_base; do not set both)."""
    fp8_matmul: bool = False
    """With dit_weight_dtype "fp8" / "fp8_scaled" on a CUDA GPU of compute capability >= 8.9: run the forward matmul of the block Linears on fp8 tensor cores (torch._scaled_mm, activations quantised per row); the backward pass computes in the compute dtype. An error elsewhere."""
    blocks_to_swap: int = Field(0, ge=0)
    """Number of DiT blocks kept on the CPU and moved to the GPU just ahead of use (0 = off, at most layers - 1; saves VRAM, costs speed)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    gradient_checkpointing_cpu_offload: bool = False
    """With gradient_checkpointing: keep the checkpointed block inputs on the CPU."""
    release_freed_memory: bool = False
    """Host RAM: the C allocator (glibc) gives every freed block of 64 KiB or more back to the system at once instead of keeping it for reuse. At the 1.3B size on the CPU the training peak is 1.1-1.3 GiB lower (bf16 storage: 4.81 -> 3.68 GiB), but steps are up to 1.4-1.7x slower (each new tensor's pages are mapped afresh); for runs limited by RAM rather than time. Linux with glibc only (a warning elsewhere)."""
    memory_allocator: Literal["system", "jemalloc", "tcmalloc"] = "system"
    """Host RAM (Linux): the C allocator `wantrainer train` runs with. "jemalloc" / "tcmalloc" restart the command with that library preloaded (Debian / Ubuntu packages libjemalloc2 / libtcmalloc-minimal4; an error when it is not installed). They reuse freed step tensors where glibc keeps them resident: at the 1.3B size on the CPU the training peak is 1.1-1.2 GiB lower (bf16 storage: 4.87 -> 3.70 GiB) at the same step time. "system" = the C library's own (glibc: see release_freed_memory, which applies to it only). A warning where preloading cannot apply (not Linux, or a process not started by `wantrainer train`)."""
    tread_selection_ratio: float = Field(0.0, ge=0, lt=1)
    """TREAD token routing (0 = off): this share of the video tokens, drawn at random for each sample and step, skips the DiT blocks tread_start_layer_idx..tread_end_layer_idx during training (faster steps; e.g. 0.5). Validation and sampling always run every token."""
    tread_start_layer_idx: int = 2
    """TREAD: first block of the routed span (negative counts from the end: -1 is the last block)."""
    tread_end_layer_idx: int = -2
    """TREAD: last block of the routed span, included; the routed tokens rejoin after it (negative counts from the end)."""
    compile_blocks: bool = False
    """torch.compile (inductor) each DiT block for faster training steps; the first steps compile (slow). Needs Triton on CUDA or a C++ compiler on the CPU, checked when the run starts. Training only (validation and samples of the run use the compiled blocks too)."""
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

    @property
    def weight_dtype(self) -> str:
        """``dit_weight_dtype`` with the older keys folded in ("fp8" for fp8_base, "fp8_scaled" for fp8_scaled)."""
        if self.fp8_scaled:
            return "fp8_scaled"
        if self.fp8_base:
            return "fp8"
        return self.dit_weight_dtype
