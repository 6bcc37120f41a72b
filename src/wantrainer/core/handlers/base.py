"""The handler protocol: work the trainer delegates at fixed points of the loop.

Handlers (checkpointing, validation loss, sampling, metrics) are built by the trainer builder from their own
config sections and called by ``Trainer`` in order; the loop never names them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from ..training_core import Trainer


@runtime_checkable
class TrainerHandler(Protocol):
    """Every method is optional in spirit: the base class below gives no-op defaults."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None:
        """After an optimiser step; ``trainer.state.step`` already counts it."""

    def on_epoch_end(self, trainer: Trainer) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Handler:
    """No-op base for handlers; override what you need."""

    name = "handler"

    def on_train_start(self, trainer: Trainer) -> None:
        return None

    def on_step_end(self, trainer: Trainer) -> None:
        return None

    def on_epoch_end(self, trainer: Trainer) -> None:
        return None

    def on_train_end(self, trainer: Trainer) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def evaluation_variants(trainer: Trainer, purpose: str) -> list[Any]:
    """The enhancements' extra weight sets (``EvaluationVariant``) validation / sampling also run with."""
    return [v for enh in getattr(trainer, "enhancements", []) for v in enh.evaluation_variants(purpose)]
