"""The console progress bar (CLI layer only): step/total, loss, lr, it/s, ETA, plus handlers' fields."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ...common.progress import progress_bar
from .base import Handler


class ProgressBarHandler(Handler):
    name = "progress"

    def __init__(self, **tqdm_kwargs: Any):
        self.kwargs = tqdm_kwargs
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Any) -> None:
        self.bar = progress_bar(total=trainer.total_steps, initial=trainer.state.step, desc="steps", unit="step",
                                **self.kwargs)

    def on_step_end(self, trainer: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.state.step - self.bar.n)
        self.bar.set_postfix(trainer.progress_postfix, refresh=False)

    def on_train_end(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def state_dict(self) -> dict[str, Any]:
        return {}
