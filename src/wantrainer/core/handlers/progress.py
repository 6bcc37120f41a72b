"""The console progress bar (CLI layer only): step/total, loss, lr, it/s, ETA, plus handlers' fields."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from .base import Handler


class ProgressBarHandler(Handler):
    name = "progress"

    def __init__(self, **tqdm_kwargs: Any):
        self.kwargs = tqdm_kwargs
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Any) -> None:
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, desc="steps", unit="step",
                        dynamic_ncols=True, **self.kwargs)

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
