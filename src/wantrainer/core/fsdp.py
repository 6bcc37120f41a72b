"""FSDP2 for full fine-tuning (``distributed_engine = "fsdp"``): the DiT's weights, gradients and optimiser state
are sharded over the processes with ``torch.distributed.fsdp.fully_shard``.

- Each transformer block is one FSDP unit and the root (embeddings, head) another; a unit's weights are gathered
  just before its forward (and again for its backward) and freed after.
- The trained parameters become float32 ``DTensor`` shards: they are the optimiser's parameters (no separate
  master copy), so its state is sharded the same way. ``MixedPrecisionPolicy``: gathered in the compute dtype on
  CUDA (bf16 / fp16), float32 on the CPU; gradients reduce-scattered in float32. Frozen parameters stay in the
  dtype they were loaded in, sharded as well.
- FSDP reduce-scatters (averages) the gradients in backward, so the loop does not all-reduce them again; the
  clipping norm is computed over the shards and reduced over the processes.
- State folders hold the trained shards and the optimiser state as a ``torch.distributed.checkpoint`` folder
  (``sharded/``, one file per process), so a resume needs the same number of processes.
- The exported DiT is gathered with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: every
  process takes part, the main process writes the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..common.logger import get_logger
from ..errors import UserError
from .distributed import DataParallelEngine, is_distributed

logger = get_logger(__name__)

SHARDED_DIR = "sharded"
"""The ``torch.distributed.checkpoint`` folder inside a state folder (trained weights and optimiser state)."""


def make_engine(engine: str, accelerator: Any) -> Any:
    """The engine of ``distributed_engine``; with one process FSDP has nothing to shard (the plain path)."""
    if engine == "ddp":
        return DataParallelEngine(accelerator)
    if not is_distributed():
        logger.info('distributed_engine = "fsdp" with one process: nothing to shard, training as one process')
        return DataParallelEngine(accelerator)
    return FullyShardedEngine(accelerator)


@torch.no_grad()
def _to_float32(module: nn.Module, prefix: str, trained: Sequence[str]) -> None:
    """The ``trained`` parameters of ``module`` (not yet sharded) in float32."""
    from torch.distributed.tensor import DTensor

    names = set(trained)
    for name, param in module.named_parameters(prefix=prefix.rstrip(".")):
        if name in names and not isinstance(param, DTensor) and param.dtype != torch.float32:
            param.data = param.data.float()


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's ``AcceleratedOptimizer``."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer) \
        else optimizer


class FullyShardedEngine:
    """FSDP2 over every process of the run (see the module doc)."""

    name = "fsdp"
    sharded = True

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.model: nn.Module | None = None

    # -- the model ---------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, trained: Sequence[str], compute_dtype: torch.dtype) -> None:
        """Make the ``trained`` parameters float32 and shard ``model``: each block, then the root."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = self.accelerator.device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        gathered = compute_dtype if device.type == "cuda" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32)
        # Unit by unit: the trained weights become float32 just before their unit is moved to the device and
        # sharded, so neither the device nor the CPU ever holds the whole model in float32.
        for index, block in enumerate(model.blocks):
            _to_float32(block, f"blocks.{index}.", trained)
            fully_shard(block, mesh=mesh, mp_policy=policy)
        _to_float32(model, "", trained)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = model
        logger.info("FSDP over %d processes: %d block units + the root, gathered in %s, gradients reduced in "
                    "float32", dist.get_world_size(), len(model.blocks), str(gathered).removeprefix("torch."))

    def report_shards(self, params: Sequence[nn.Parameter]) -> list[int]:
        """Trained parameter elements each process holds (one all-gather; logged by the main process)."""
        local = sum(p.to_local().numel() for p in params)
        device = self.accelerator.device  # NCCL reduces device tensors only
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor([local], dtype=torch.int64, device=device))
        held = [int(c) for c in counts]
        total = sum(p.numel() for p in params)
        logger.info("FSDP shards of the %d trained parameters: %s elements per process (%s of the total)",
                    total, " / ".join(map(str, held)), " / ".join(f"{h / max(total, 1):.1%}" for h in held))
        return held

    # -- the loop ----------------------------------------------------------------------------------------
    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Nothing to do: every process loaded the same file and holds its own shard of it."""

    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Nothing to do: FSDP reduce-scattered (averaged) the gradients in backward."""

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float) -> float:
        """The global L2 norm of the gradients (their shards' squared sums added over the processes), and each
        shard scaled by ``max_norm / (norm + 1e-6)`` when that is below 1 (the formula of ``clip_grad_norm_``)."""
        from torch.distributed.tensor import DTensor

        shards = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
        for shard in shards:
            squares += shard.float().square().sum()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        norm = float(squares.sqrt())
        if math.isfinite(max_norm) and shards:
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(shards, coef)
        return norm

    # -- state folders -----------------------------------------------------------------------------------
    def _options(self, full: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if full:
            return StateDictOptions(full_state_dict=True, cpu_offload=True)
        return StateDictOptions(ignore_frozen_params=True)

    def save_shards(self, folder: Path, optimizers: Sequence[Any]) -> None:
        """Every process writes its shard of the trained weights and the optimiser state into ``folder``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, [_unwrap(o) for o in optimizers], options=self._options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / SHARDED_DIR))

    def load_shards(self, folder: Path, optimizers: Sequence[Any]) -> None:
        """The inverse of ``save_shards`` (same process count; ``read_state_folder`` checked it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = folder / SHARDED_DIR
        if not (path / ".metadata").is_file():
            raise UserError(f"`resume`: {folder} has no sharded FSDP state ({SHARDED_DIR}/); it was not saved with "
                            'distributed_engine = "fsdp"')
        from torch.distributed.checkpoint.api import CheckpointException

        optims = [_unwrap(o) for o in optimizers]
        model_sd, optim_sd = get_state_dict(self.model, optims, options=self._options())
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(self.model, optims, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=self._options())
        except (CheckpointException, KeyError, ValueError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"`resume`: the FSDP shards in {path} do not fit this run ({detail}); trainable_blocks "
                            "and the optimiser settings must be those of the run that saved it") from None

    # -- the export --------------------------------------------------------------------------------------
    def gather_full_state(self) -> dict[str, torch.Tensor]:
        """The whole DiT state dict on the CPU of the main process (empty elsewhere); every process calls it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options(full=True))


__all__ = ["FullyShardedEngine", "SHARDED_DIR", "make_engine"]
