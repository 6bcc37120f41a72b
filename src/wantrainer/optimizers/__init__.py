"""Optimisers and learning-rate schedules."""

from .factory import KNOWN_OPTIMIZERS, create_optimizer, parse_optimizer_args
from .schedulers import SCHEDULES, LrMultiplier, create_lr_scheduler, resume_lr_scheduler, warmup_steps

__all__ = [
    "KNOWN_OPTIMIZERS",
    "SCHEDULES",
    "LrMultiplier",
    "create_lr_scheduler",
    "create_optimizer",
    "parse_optimizer_args",
    "resume_lr_scheduler",
    "warmup_steps",
]
