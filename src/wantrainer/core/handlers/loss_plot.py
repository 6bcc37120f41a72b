"""A loss plot PNG next to every saved LoRA, for runs watched without TensorBoard.

``{lora stem}_loss.png``: the training loss per step (raw, and smoothed with an exponential moving average)
and, with [[datasets.val]], the validation loss at each of ``validation_timesteps`` over the steps it was
measured. ``LossHistory`` records the values (before checkpointing, so a saved state holds them and a resumed
run's plot continues); ``LossPlotWriter`` (after checkpointing) draws the plot for each LoRA file written at
that point. Neither touches the model, the data or a random stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...common.logger import get_logger
from ...utils.atomic import atomic_path
from .base import Handler

logger = get_logger(__name__)
SMOOTHING = 0.9


class LossHistory(Handler):
    name = "loss_history"

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: dict[int, list[tuple[int, float]]] = {}
        """validation timestep -> [(step, loss)]"""

    def on_step_end(self, trainer: Any) -> None:
        result = trainer.last_step
        if result is not None and not result.skipped:
            self.train.append((result.step, float(result.loss)))
        self._record_validation(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._record_validation(trainer)

    def on_train_end(self, trainer: Any) -> None:
        self._record_validation(trainer)

    def _record_validation(self, trainer: Any) -> None:
        from .validation import ValidationHandler

        for handler in trainer.handlers:
            if isinstance(handler, ValidationHandler) and handler.last and handler._last_step is not None:
                for key, value in handler.last.items():
                    if key.startswith("val/loss_t"):
                        points = self.val.setdefault(int(key.removeprefix("val/loss_t")), [])
                        if not points or points[-1][0] != handler._last_step:
                            points.append((handler._last_step, float(value)))

    def state_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": {t: list(p) for t, p in self.val.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = [tuple(p) for p in state.get("train", [])]
        self.val = {int(t): [tuple(p) for p in points] for t, points in state.get("val", {}).items()}


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards 0)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        out.append(average / (1 - factor**count))
    return out


def write_loss_plot(history: LossHistory, title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    panels = 2 if history.val else 1
    figure = Figure(figsize=(6 * panels, 4), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    steps = [s for s, _ in history.train]
    losses = [v for _, v in history.train]
    axes[0].plot(steps, losses, color="#4c72b0", alpha=0.3, linewidth=0.8, label="loss")
    axes[0].plot(steps, smoothed(losses), color="#4c72b0", linewidth=1.8, label=f"smoothed (EMA {SMOOTHING})")
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    if history.val:
        for timestep, points in sorted(history.val.items()):
            axes[1].plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                         label=f"t = {timestep}")
        axes[1].set_title("validation loss per timestep")
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize=8)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


class LossPlotWriter(Handler):
    """Writes ``{stem}_loss.png`` beside each LoRA file the checkpoint handler wrote since the last call."""

    name = "loss_plot"

    def __init__(self, history: LossHistory, checkpoint: Any) -> None:
        self.history = history
        self.checkpoint = checkpoint
        self._seen = 0

    def _write_new(self, trainer: Any) -> None:
        written = self.checkpoint.written
        new, self._seen = written[self._seen:], len(written)
        if not trainer.accelerator.is_main_process or not self.history.train:
            return
        for lora in (p for p in new if p.suffix == ".safetensors"):
            path = lora.with_name(f"{lora.stem}_loss.png")
            try:
                write_loss_plot(self.history, f"{lora.stem} (step {trainer.state.step})", path)
            except OSError as exc:  # a plot is not saved work: the run goes on without it
                logger.warning("could not write %s (%s)", path, exc.strerror or exc)
                continue
            logger.info("saved %s", path)

    def on_step_end(self, trainer: Any) -> None:
        self._write_new(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        self._write_new(trainer)

    def on_train_end(self, trainer: Any) -> None:
        self._write_new(trainer)
