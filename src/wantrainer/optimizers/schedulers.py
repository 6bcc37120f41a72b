"""Learning-rate schedules as ``LambdaLR`` multipliers of each group's peak lr.

``s`` = optimiser step, ``W`` = warm-up steps, ``T`` = total steps, ``p = (s - W) / (T - W)`` clipped to [0, 1].
Warm-up applies to every schedule: the multiplier is ``s / W`` for ``s < W`` (0 at the first step, as in
transformers' ``get_*_schedule_with_warmup``). Adafactor with ``relative_step=True`` computes its own step size:
only ``constant`` without warm-up is accepted there, and the scheduler just reports Adafactor's step size.
A resumed run keeps only the step count of the saved schedule (``resume_lr_scheduler``): the rest follows the config.

- constant, constant_with_warmup: 1 after warm-up (the same schedule; both names are accepted)
- linear: ``1 - p``                      - cosine: ``0.5 (1 + cos(pi p))``
- cosine_with_restarts: ``0.5 (1 + cos(pi ((cycles p) mod 1)))``, 0 at the end
- polynomial: ``(1 - p) ** power``       - cosine_with_min_lr: ``m + (1 - m) 0.5 (1 + cos(pi p))``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config.training import OptimizerConfig
from ..errors import UserError

SCHEDULES = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
)  # fmt: skip


def warmup_steps(value: int | float, total_steps: int) -> int:
    """``lr_warmup_steps``: an int is a step count, a float below 1 a fraction of ``total_steps``."""
    if isinstance(value, float) and value < 1.0:
        return int(round(value * total_steps))
    return int(value)


@dataclass
class LrMultiplier:
    """The multiplier for one schedule (a picklable callable, so it lives in the scheduler state)."""

    name: str
    warmup: int
    total: int
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        p = min(max((step - self.warmup) / max(1, self.total - self.warmup), 0.0), 1.0)
        if self.name == "linear":
            return 1.0 - p
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if self.name == "cosine_with_restarts":
            return 0.0 if p >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * p) % 1.0)))
        if self.name == "polynomial":
            return (1.0 - p) ** self.power
        if self.name == "cosine_with_min_lr":
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        raise ValueError(f"unknown lr_scheduler {self.name!r}")


def create_lr_scheduler(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimiser step over ``total_steps``."""
    if cfg.lr_scheduler not in SCHEDULES:
        raise UserError(f"lr_scheduler = {cfg.lr_scheduler!r} is unknown; use one of {', '.join(SCHEDULES)}")
    warmup = warmup_steps(cfg.lr_warmup_steps, total_steps)
    if any(group.get("lr") is None for group in optimizer.param_groups):
        return _self_scheduled(cfg, optimizer, warmup)
    if warmup >= total_steps > 0:
        raise UserError(f"lr_warmup_steps = {cfg.lr_warmup_steps} covers the whole run of {total_steps} steps")
    multiplier = LrMultiplier(
        name=cfg.lr_scheduler,
        warmup=warmup,
        total=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
        min_lr_ratio=cfg.lr_scheduler_min_lr_ratio,
    )
    return LambdaLR(optimizer, multiplier)


def _self_scheduled(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer, warmup: int) -> LambdaLR:
    """Adafactor with ``relative_step=True`` sets its own step size: a schedule on top cannot be honoured.

    The returned scheduler only reports the step size Adafactor used (for the logs); it changes nothing.
    """
    if cfg.lr_scheduler not in ("constant", "constant_with_warmup") or warmup:
        raise UserError(
            f"lr_scheduler = {cfg.lr_scheduler!r} / lr_warmup_steps = {cfg.lr_warmup_steps}: Adafactor with "
            "relative_step=True schedules its own step size (warmup_init=True for its warm-up); set "
            'lr_scheduler = "constant" and lr_warmup_steps = 0'
        )
    from transformers.optimization import AdafactorSchedule

    return AdafactorSchedule(optimizer)


def resume_lr_scheduler(scheduler: LambdaLR, state: dict) -> None:
    """Continue ``scheduler`` (built from this run's config) at the position saved in ``state``.

    Only the step count comes from the saved state; the peak lrs and the shape (``lr_scheduler``, warm-up,
    total steps) come from the config, so a run resumed with a raised ``max_train_steps`` follows the longer
    schedule instead of staying at the end of the old one. With an unchanged config this equals
    ``scheduler.load_state_dict(state)``.
    """
    scheduler.last_epoch = int(state["last_epoch"])
    scheduler._step_count = int(state.get("_step_count", scheduler.last_epoch + 1))
    if isinstance(scheduler.lr_lambdas[0], LrMultiplier):
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
