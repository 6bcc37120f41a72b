"""Training state that is not a tensor of the model: counters and random-number generator states.

Everything here round-trips through ``state_dict()`` / ``load_state_dict()`` with plain Python values and
tensors only, so a state folder loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
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
