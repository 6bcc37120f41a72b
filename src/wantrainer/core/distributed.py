"""The few collective operations the loop needs (no-ops in a single process).

The LoRA parameters live in a network that wraps the DiT's Linear layers rather than in a module whose
``forward`` we call, so instead of a ``DistributedDataParallel`` wrapper the trainer averages the gradients
itself: one flattened all-reduce per optimiser step, after the last micro-batch (the same arithmetic as DDP
with ``no_sync`` during accumulation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``p.grad`` over the processes (parameters without a gradient take part as zeros)."""
    if not is_distributed() or not params:
        return
    world = dist.get_world_size()
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def sum_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of a few numbers over the processes."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Make every process start from the main process's initial values."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


class DataParallelEngine:
    """``distributed_engine = "ddp"`` (and every single-process run): each process holds the whole model, the
    loop averages the gradients itself (``average_gradients``) and accelerate clips them."""

    name = "ddp"
    sharded = False

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        broadcast_parameters(params)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        average_gradients(params)

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else float("nan")
