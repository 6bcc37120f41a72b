"""Training timestep samplers (flow matching)."""

from .timesteps import SAMPLERS, TimestepSampler, apply_shift, flux_shift_for_seq_len

__all__ = ["SAMPLERS", "TimestepSampler", "apply_shift", "flux_shift_for_seq_len"]
