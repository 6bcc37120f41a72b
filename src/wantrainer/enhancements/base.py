"""The enhancement protocol: optional training features plug into the loop through these hooks only.

An enhancement is built from the config by ``from_config`` (returning ``None`` when it is not enabled), is
registered by name in ``enhancements.registry`` and lives in its own folder. The trainer calls the hooks of
every active enhancement at fixed points and never names one:

1. ``setup(model)`` once, after the DiT and the LoRA network are built (add modules, register taps);
2. ``trainable_params()`` once, to add its own parameters to the optimiser;
3. ``modify_inputs(batch)`` on every micro-batch, before noise is added;
4. ``loss(ctx)`` on every micro-batch, after the forward pass: an extra loss term and its metrics;
5. ``on_step_end(state)`` after every optimiser step;
6. ``teardown()`` when training ends (remove hooks, free memory).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config_parser import WanTrainerConfig
    from ..core.state import TrainState


@dataclass
class StepContext:
    """What one micro-batch's forward pass produced; passed to every loss term.

    Shapes: ``latents`` / ``noise`` / ``noisy`` / ``target`` / ``pred`` are [B, C, F, H, W]; ``t`` is [B] in
    (0, 1) and ``timesteps`` = 1000 * t is what the model saw.
    """

    batch: dict[str, Any]
    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    timesteps: torch.Tensor
    pred: torch.Tensor | None = None
    model: torch.nn.Module | None = None
    expert: str = "default"
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    """Free space for enhancements to pass tensors from ``modify_inputs`` / forward taps to ``loss``."""

    def __getitem__(self, key: str) -> Any:
        """Mapping-style access (``ctx["t"]``) for criteria written against a dict."""
        if key in self.extras:
            return self.extras[key]
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return key in self.extras or hasattr(self, key)


@runtime_checkable
class Enhancement(Protocol):
    name: str

    @classmethod
    def from_config(cls, cfg: WanTrainerConfig) -> Enhancement | None: ...

    def setup(self, model: torch.nn.Module) -> None: ...

    def teardown(self) -> None: ...

    def trainable_params(self) -> Iterable[torch.nn.Parameter] | list[dict[str, Any]]: ...

    def modify_inputs(self, batch: dict[str, Any]) -> dict[str, Any]: ...

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]: ...

    def on_step_end(self, state: TrainState) -> None: ...


class BaseEnhancement:
    """No-op defaults: an enhancement overrides only the hooks it needs."""

    name = "enhancement"

    @classmethod
    def from_config(cls, cfg: WanTrainerConfig) -> BaseEnhancement | None:
        return None

    def setup(self, model: torch.nn.Module) -> None:
        return None

    def teardown(self) -> None:
        return None

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return []

    def modify_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def on_step_end(self, state: TrainState) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
