"""Training length, optimiser, network, timesteps and loss (top-level keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section


class TrainingConfig(Section):
    max_train_steps: int = Field(1600, ge=1)
    """Number of optimiser steps to train for (ignored when max_train_epochs is set)."""
    max_train_epochs: int | None = Field(None, ge=1)
    """Train for this many epochs instead of max_train_steps."""
    seed: int = 42
    """Seed for noise, timesteps, shuffling and LoRA initialisation; a run is reproducible from it."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated into one optimiser step."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm to this value (0 disables clipping)."""
    max_data_loader_n_workers: int = Field(2, ge=0)
    """DataLoader worker processes (0 loads in the main process). They start from a forkserver, so they hold none of the model's memory."""
    persistent_data_loader_workers: bool = False
    """Keep DataLoader workers alive between epochs."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Stop the run after this many consecutive steps with a NaN/Inf loss (each one is skipped)."""
    distributed_engine: Literal["ddp", "fsdp"] = "ddp"
    """With several processes: "ddp" (every process holds the whole model; gradients averaged) or "fsdp" (network_module = "full" only: weights, gradients and optimiser state sharded over the processes with FSDP2; see docs/full_finetune.md)."""


LrScheduler = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
]


class OptimizerConfig(Section):
    optimizer_type: str = "adamw"
    """adamw, adamw8bit, adafactor, prodigy, lion, or a dotted class path such as "torch.optim.SGD"."""
    optimizer_args: list[str] = Field(default_factory=list)
    """Extra optimiser arguments as "key=value" strings; values are Python literals (e.g. "betas=(0.9,0.99)")."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: LrScheduler = "constant"
    """Learning-rate schedule."""
    lr_warmup_steps: int | float = Field(0, ge=0)
    """Warm-up length: an integer number of steps, or a float below 1 as a fraction of the total steps."""
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    """cosine_with_restarts: number of cycles."""
    lr_scheduler_power: float = Field(1.0, gt=0)
    """polynomial: power of the decay."""
    lr_scheduler_min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine_with_min_lr: final learning rate as a fraction of learning_rate."""


class NetworkConfig(Section):
    network_module: str = "networks.lora_wan"
    """The adapter family: "networks.lora_wan" (LoRA, DoRA with network_args dora_wd=True) or "lycoris.kohya" (network_args algo=loha | lokr | lora; see docs/adapters.md)."""
    network_dim: int = Field(32, ge=1)
    """Rank of the adapter (LoRA / LoHa rank; LoKr: rank of the decomposed second Kronecker factor)."""
    network_alpha: float = Field(16.0, gt=0)
    """Alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora; 1 for a LoKr with two full factors)."""
    network_dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout on the LoRA down-projection output during training."""
    network_args: list[str] = Field(default_factory=list)
    """Extra network arguments as "key=value" literals: include_patterns / exclude_patterns (lists of regex matched against whole module paths such as "blocks.3.ffn.0"), verbose = True, dora_wd = True (DoRA); with lycoris.kohya also algo = loha | lokr | lora, factor = N and full_matrix = True (LoKr)."""
    network_weights: Path | None = None
    """Continue training from this existing LoRA file (kohya, diffusion_model or diffusers layout; network_dim must match)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(rank)."""
    rank_dropout: float | None = Field(None, ge=0, lt=1)
    """Drop whole rank components with this probability during training."""
    module_dropout: float | None = Field(None, ge=0, lt=1)
    """Skip a LoRA module entirely with this probability during training."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+: the up-projection learns this many times faster than the down-projection."""
    save_precision: Literal["fp32", "fp16", "bf16"] = "bf16"
    """dtype of the tensors in saved LoRA files."""
    dual_lora_mode: Literal["shared", "separate"] = "shared"
    """wan22 with both experts: one LoRA for both ("shared") or one per expert ("separate")."""
    trainable_blocks: list[str] = Field(default_factory=list)
    """network_module = "full": regexes matched against whole parameter names (e.g. "blocks\\.(1[0-9]|2[0-9])\\..*"); the matching parameters train, all others stay frozen. Empty: every parameter of the DiT."""
    full_save_precision: Literal["bf16", "fp16", "fp32", "fp8_scaled"] = "bf16"
    """network_module = "full": precision of the saved DiT file (fp8_scaled: ComfyUI's scaled-fp8 format)."""
    full_save_comfyui_prefix: bool = True
    """network_module = "full": save keys with ComfyUI's model.diffusion_model. prefix (false: the original Wan layout)."""


TimestepSampling = Literal["uniform", "sigmoid", "shift", "logsnr", "qinglong", "flux_shift", "logit_normal"]


class TimestepConfig(Section):
    timestep_sampling: TimestepSampling = "shift"
    """How training timesteps are drawn."""
    discrete_flow_shift: float = Field(3.0, gt=0)
    """Shift applied by timestep_sampling = "shift" (higher = noisier timesteps)."""
    sigmoid_scale: float = Field(1.0, gt=0)
    """Scale of the normal draw before the sigmoid (sigmoid, shift, flux_shift, qinglong); larger = flatter."""
    weighting_scheme: Literal["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"] = "none"
    """Per-sample loss weighting by timestep."""
    logit_mean: float = 0.0
    """Mean for logit_normal / logsnr / qinglong sampling and the logit_normal weighting."""
    logit_std: float = Field(1.0, gt=0)
    """Standard deviation for logit_normal / logsnr / qinglong sampling and the logit_normal weighting."""
    mode_scale: float = 1.29
    """Scale for the "mode" weighting scheme."""
    min_timestep: int | None = Field(None, ge=0, le=1000)
    """Lowest training timestep (0-1000); the draw is rescaled into [min, max], keeping its shape."""
    max_timestep: int | None = Field(None, ge=0, le=1000)
    """Highest training timestep (0-1000)."""


class LossConfig(Section):
    loss_type: Literal["mse", "l1", "huber", "pseudo_huber"] = "mse"
    """Element loss between the prediction and the flow-matching target (d = pred - target): mse d**2, l1 |d|,
    huber the exact Huber loss x2 (d**2 up to huber_c, then linear), pseudo_huber 2c(sqrt(d**2 + c**2) - c),
    which is what kohya's sd-scripts call "huber" (without its timestep schedule of c)."""
    huber_c: float = Field(0.1, gt=0)
    """Transition point of the huber / pseudo_huber losses."""
    prior_loss_weight: float = Field(1.0, ge=0)
    """Loss weight of items from datasets marked is_reg = true."""
