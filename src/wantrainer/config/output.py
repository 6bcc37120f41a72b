"""Saving, resuming, logging, validation and sampling (top-level keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .base import Section


class SavingConfig(Section):
    output_dir: Path = Path("output")
    """Folder for LoRA files, states and samples (relative to the config file)."""
    output_name: str = Field("wan_lora", min_length=1)
    """Base name of the saved files: {output_name}.safetensors, {output_name}-step00000100.safetensors, ..."""
    save_every_n_steps: int | None = Field(None, ge=1)
    """Save the LoRA every N optimiser steps."""
    save_every_n_epochs: int | None = Field(None, ge=1)
    """Save the LoRA every N epochs."""
    save_last_n_steps: int | None = Field(None, ge=1)
    """Delete step saves (LoRA and state) more than N steps older than the newest one."""
    save_last_n_epochs: int | None = Field(None, ge=1)
    """Keep only the last N epoch saves."""
    save_state: bool = False
    """Also save the full training state (optimiser, scheduler, RNG, data position) with each save."""
    save_loss_plot: bool = True
    """Write {name}_loss.png beside each saved LoRA: the training loss (raw and smoothed) and the validation loss
    per timestep."""
    resume: Path | None = None
    """Resume from this state folder (wins over auto_resume)."""
    auto_resume: bool = True
    """Resume from the newest valid state folder of output_name in output_dir, if there is one (a finished run
    run again does nothing). With auto_resume = false a run that would start at step 0 over earlier saves of
    output_name is refused (see overwrite_output)."""
    overwrite_output: bool = False
    """Start at step 0 even though output_dir holds LoRA files / state folders of output_name from an earlier
    run: those saves are deleted first, so the folder never mixes two runs. Off: such a run is refused."""


class LoggingConfig(Section):
    logging_dir: Path | None = None
    """TensorBoard folder (default: {output_dir}/logs)."""
    log_with: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    """Where metrics go."""
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console log level."""


class ValidationConfig(Section):
    validate_every_n_steps: int | None = Field(None, ge=1)
    """Compute the validation loss on [[datasets.val]] every N steps."""
    validate_on_epoch_end: bool = False
    """Compute the validation loss at the end of every epoch."""
    validation_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Timesteps (0-1000) at which the validation loss is measured; a list or a comma string "200,500,800"."""

    @field_validator("validation_timesteps", mode="before")
    @classmethod
    def _split_comma_string(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return parts
        return value

    @field_validator("validation_timesteps")
    @classmethod
    def _in_range(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one timestep")
        bad = [t for t in value if not 0 <= t <= 1000]
        if bad:
            raise ValueError(f"timesteps must be within 0..1000, got {bad}")
        return value


class SamplePrompt(Section):
    text: str
    """The prompt."""
    negative_prompt: str = ""
    """Negative prompt used with classifier-free guidance. Empty by default, as in diffusers' WanPipeline; Wan's
    reference scripts (and many ComfyUI workflows) use a long Chinese negative prompt: paste it here to match."""
    width: int = Field(832, ge=16, multiple_of=16)
    """Width in pixels (multiple of 16)."""
    height: int = Field(480, ge=16, multiple_of=16)
    """Height in pixels (multiple of 16)."""
    frames: int = Field(81, ge=1)
    """Frame count, 4k+1 (1 writes a png)."""
    seed: int = 42
    """Noise seed."""
    steps: int = Field(20, ge=1)
    """Denoising steps."""
    cfg_scale: float = Field(5.0, ge=0)
    """Classifier-free guidance scale (1.0 disables the negative pass)."""
    discrete_flow_shift: float = Field(5.0, gt=0)
    """Flow shift of the sampling schedule."""
    sample_solver: Literal["unipc", "euler"] = "unipc"
    """Solver: unipc or euler."""
    image: Path | None = None
    """Image-to-video models: the first frame (resized to cover width x height, centre-cropped). Required for I2V / FLF2V, not accepted by T2V."""
    last_image: Path | None = None
    """FLF2V only: the last frame, prepared like `image`."""

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, value: int) -> int:
        if (value - 1) % 4 != 0:
            raise ValueError(f"frames must be 4k+1 (1, 5, 9, ..., 81), got {value}")
        return value


class SamplingConfig(Section):
    sample_every_n_steps: int | None = Field(None, ge=1)
    """Generate the [[sample_prompts]] every N steps."""
    sample_every_n_epochs: int | None = Field(None, ge=1)
    """Generate the [[sample_prompts]] every N epochs."""
    sample_at_first: bool = False
    """Generate the samples before the first step (a resumed run does not sample again at its start)."""
    sample_prompts: list[SamplePrompt] = Field(default_factory=list)
    """[[sample_prompts]] tables: text, negative_prompt, width, height, frames, seed, steps, cfg_scale, ..."""
