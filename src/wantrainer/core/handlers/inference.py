"""Running the model under training for evaluation (validation loss, samples) without disturbing training.

``inference_session`` puts the DiT and the LoRA network(s) in eval mode, disables autograd and saves every
global random generator (Python, NumPy, torch CPU and CUDA); on exit it restores the modes, the generators
and the active Wan 2.2 expert. A run that evaluates therefore follows the same training trajectory as one
that does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..state import global_rng_state, set_global_rng_state


def trainer_modules(trainer: Any) -> list[nn.Module]:
    """The DiT and every LoRA network of a trainer (each once)."""
    modules: list[nn.Module] = [trainer.experts.model]
    for network in trainer.networks.values():
        if all(network is not m for m in modules):
            modules.append(network)
    return modules


@contextlib.contextmanager
def inference_session(trainer: Any) -> Iterator[None]:
    """Eval mode, no grad, global RNG saved and restored, active expert restored."""
    modules = trainer_modules(trainer)
    modes = [(module, [(m, m.training) for m in module.modules()]) for module in modules]
    rng = global_rng_state()
    experts = trainer.experts
    active = experts.active
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        if experts.active != active:
            experts.activate(active)
        for _, flags in modes:
            for m, flag in flags:
                m.train(flag)
        set_global_rng_state(rng)
