"""Element-wise losses between the prediction and the flow-matching target (no reduction).

All four have the same scale near zero (about ``d**2`` for a small error ``d``), so switching the
loss type does not silently change the effective learning rate:

- ``mse``: ``d**2``
- ``l1``: ``|d|``
- ``huber``: ``2 * huber(d, delta=c)``: ``d**2`` for ``|d| <= c``, ``2c|d| - c**2`` beyond
- ``pseudo_huber``: ``2c * (sqrt(d**2 + c**2) - c)``: smooth, ``~d**2`` near 0, ``~2c|d|`` far away
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ElementLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square()


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs()


def huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return 2.0 * F.huber_loss(pred, target, reduction="none", delta=c)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return 2.0 * c * (torch.sqrt((pred - target).square() + c * c) - c)


LOSS_TYPES = ("mse", "l1", "huber", "pseudo_huber")


def element_loss(loss_type: str, huber_c: float = 0.1) -> ElementLoss:
    """The element loss ``(pred, target) -> tensor of the same shape`` for ``loss_type``."""
    if loss_type == "mse":
        return mse
    if loss_type == "l1":
        return l1
    if loss_type == "huber":
        return lambda pred, target: huber(pred, target, huber_c)
    if loss_type == "pseudo_huber":
        return lambda pred, target: pseudo_huber(pred, target, huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
