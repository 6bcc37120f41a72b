"""Training state that is not a tensor of the model: counters and random-number generator states.

Everything here round-trips through ``state_dict()`` / ``load_state_dict()`` with plain Python values and
tensors only, so a state folder loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters of the run. ``step`` counts optimiser steps (skipped non-finite ones included)."""

    step: int = 0
    epoch: int = 0
    """Completed epochs."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (this rank)."""
    nonfinite_in_row: int = 0
    expert_steps: dict[str, int] = field(default_factory=dict)
    """Optimiser steps trained per expert."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.expert_steps = {str(k): int(v) for k, v in state.get("expert_steps", {}).items()}


def global_rng_state() -> dict[str, Any]:
    """The process-wide generators: Python, NumPy, torch CPU and (when present) every CUDA device."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator (draws are identical on every device and platform)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


class RandomStream:
    """A random stream of its own for the model's training forward / backward (LoRA dropouts and anything else
    the model draws), swapped in as the process-wide torch generator (CPU and the device's CUDA generator) only
    inside ``active()``.

    The model keeps drawing from the global generator, which ``torch.utils.checkpoint`` saves and replays when
    it recomputes a block, so dropout masks stay consistent under gradient checkpointing; and because nothing
    else (data-loader workers, validation, sampling, user code) ever draws from this stream, the state saved
    with a checkpoint continues exactly where the interrupted run stopped.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.device = torch.device(device)
        self.cpu_state = seeded_generator(seed).get_state()
        self.cuda_state: torch.Tensor | None = None

    def _cuda_index(self) -> int | None:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _initial_cuda_state(self, index: int) -> torch.Tensor:
        outer = torch.cuda.get_rng_state(index)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(self.seed)
        state = torch.cuda.get_rng_state(index)
        torch.cuda.set_rng_state(outer, index)
        return state

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        index = self._cuda_index()
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(self.cpu_state)
        outer_cuda = None
        if index is not None:
            outer_cuda = torch.cuda.get_rng_state(index)
            torch.cuda.set_rng_state(self.cuda_state if self.cuda_state is not None
                                     else self._initial_cuda_state(index), index)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if index is not None:
                self.cuda_state = torch.cuda.get_rng_state(index)
                torch.cuda.set_rng_state(outer_cuda, index)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": self.cpu_state.clone()}
        if self.cuda_state is not None:
            state["cuda"] = self.cuda_state.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu_state = state["cpu"].clone()
        self.cuda_state = state["cuda"].clone() if "cuda" in state else None
