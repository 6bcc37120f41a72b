"""The ``ema_*`` keys: an exponential moving average of the trained network's weights."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...config.base import Section


class EmaConfig(Section):
    """EMA of the trained weights"""

    enable_ema: bool = False
    """Keep an exponential moving average of the trained weights and save it beside each LoRA as
    {name}-ema.safetensors (same format; it loads wherever the LoRA loads)."""
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    """EMA decay per update: ema = decay * ema + (1 - decay) * weights (default 0.999 unless
    ema_half_life_steps is set)."""
    ema_half_life_steps: float | None = Field(None, gt=0.0)
    """Instead of ema_decay: the number of steps after which a weight's contribution has halved
    (decay = 0.5 ** (ema_update_every / ema_half_life_steps))."""
    ema_update_every: int = Field(1, ge=1)
    """Update the EMA every N optimiser steps."""
    ema_start_step: int = Field(0, ge=0)
    """Until this step the EMA copies the weights; averaging starts after it."""
    ema_warmup: Literal["none", "linear", "power"] = "none"
    """Lower decay for the first updates: "linear" min(decay, (1 + n) / (10 + n)) (torch_ema / Takenoko, diffusers
    EMAModel's default), "power" min(decay, 1 - (1 + n) ** -ema_warmup_power) (diffusers use_ema_warmup); n counts
    the updates after ema_start_step."""
    ema_warmup_power: float = Field(2.0 / 3.0, gt=0.0)
    """The exponent of ema_warmup = "power" (diffusers: 2/3 for long runs, 3/4 for short ones)."""
    ema_device: Literal["device", "cpu"] = "device"
    """Where the fp32 EMA is kept: on the training device (fast) or in CPU memory (saves VRAM)."""
    validate_with_ema: bool = False
    """Also compute the validation loss with the EMA weights (logged as val_ema/loss beside val/loss)."""
    sample_with_ema: bool = False
    """Also generate the samples with the EMA weights ({output_name}-ema_step..., TensorBoard sample_ema/)."""

    def config_problems(self, cfg: Any) -> list[str]:
        problems = []
        fields = type(self).model_fields
        set_keys = [k for k in self.model_fields_set if k != "enable_ema" and getattr(self, k) != fields[k].default]
        if set_keys and not self.enable_ema:
            problems.append(f"`{sorted(set_keys)[0]}` is set but `enable_ema` is false; set enable_ema = true or "
                            "remove the ema_* keys")
        if self.ema_decay is not None and self.ema_half_life_steps is not None:
            problems.append("`ema_decay` and `ema_half_life_steps` both set: give one of them")
        if self.enable_ema and cfg.network.network_module == "full":
            problems.append('`enable_ema` averages LoRA-family networks; network_module = "full" is not supported '
                            "(its EMA would be a second copy of the model): turn enable_ema off")
        if self.enable_ema and self.validate_with_ema and not cfg.datasets.val:
            problems.append("`validate_with_ema` needs a [[datasets.val]] dataset and a validation trigger")
        return problems

    @property
    def decay(self) -> float:
        """The decay per update."""
        if self.ema_half_life_steps is not None:
            return 0.5 ** (self.ema_update_every / self.ema_half_life_steps)
        return 0.999 if self.ema_decay is None else self.ema_decay


SECTION = EmaConfig
