"""Metrics: the writer behind ``trainer.metrics`` (TensorBoard / wandb / none) and the per-step scalars.

Per step: ``loss/current``, ``loss/average`` (moving average of the last ``window`` steps), ``lr/group<i>``
(``lr/<network>/group<i>`` with two networks), ``grad_norm``, ``samples_per_sec``, ``timing/data``,
``timing/forward``, ``timing/backward``, ``timing/optimizer``, plus the loss terms' own metrics, the
enhancements' ``get_<name>_metrics()`` as ``<name>/<key>`` (also on the progress bar) and, with two
Wan 2.2 experts, ``expert/high_noise`` (1 when the step trained the high-noise expert, else 0). Only the main
process writes.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ...common.logger import get_logger
from ...errors import UserError
from .base import Handler

logger = get_logger(__name__)


class MetricsLogger:
    """``log(dict, step)`` / ``log_image(tag, array, step)`` to the backends of ``log_with``.

    Nothing is created before ``open(step)`` (called when training starts), so a run that fails while starting
    leaves no empty event file. ``open(step)`` of a resumed run passes ``purge_step``: TensorBoard then drops the
    points an interrupted run logged after its last state, so the curve has no duplicated stretch.
    """

    def __init__(self, log_dir: Path | None, log_with: str, *, enabled: bool = True, run_name: str = "wantrainer",
                 config: dict[str, Any] | None = None):
        self.log_dir = log_dir
        self.log_with = log_with if enabled else "none"
        self.run_name = run_name
        self.config = config or {}
        self._tb = None
        self._wandb = None
        if self.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
            raise UserError(f'log_with = "{log_with}" needs wandb: pip install wandb (or use log_with = "tensorboard")')

    def open(self, step: int = 0) -> None:
        """Create the writers (once); ``step`` > 0 for a resumed run."""
        if self.active or self.log_with == "none":
            return
        if self.log_with in ("wandb", "all"):
            import wandb

            self._wandb = wandb.init(project=self.run_name, dir=str(self.log_dir) if self.log_dir else None,
                                     config=self.config)
        if self.log_with in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            assert self.log_dir is not None
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=step or None,
                                     filename_suffix=f".{self.run_name}")
            from ...common.commands import console_command

            logger.info("TensorBoard logs in %s (%s --logdir %s)", self.log_dir, console_command("tensorboard"),
                        self.log_dir)

    @classmethod
    def from_config(cls, logging_cfg: Any, saving_cfg: Any, *, enabled: bool, config: dict[str, Any] | None = None):
        log_dir = logging_cfg.logging_dir or Path(saving_cfg.output_dir) / "logs"
        return cls(Path(log_dir), logging_cfg.log_with, enabled=enabled, run_name=saving_cfg.output_name,
                   config=config)

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), global_step=step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 [H, W, 3]."""
        if self._tb is not None:
            self._tb.add_image(tag, image, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class MetricsHandler(Handler):
    """Logs the scalars of every optimiser step and fills the progress-bar fields."""

    name = "metrics"

    def __init__(self, window: int = 100):
        self.window = window
        self.recent: deque[float] = deque(maxlen=window)

    def on_train_start(self, trainer: Any) -> None:
        trainer.metrics.open(trainer.state.step)

    def on_step_end(self, trainer: Any) -> None:
        result = trainer.last_step
        if result is None:
            return
        if not result.skipped:
            self.recent.append(result.loss)
        average = sum(self.recent) / len(self.recent) if self.recent else float("nan")
        timings = result.timings
        step_time = max(timings.get("step", 0.0), 1e-9)
        values = {
            "loss/current": result.loss,
            "loss/average": average,
            "samples_per_sec": result.samples / step_time,
            **{f"timing/{k}": timings[k] for k in ("data", "forward", "backward", "optimizer") if k in timings},
            **{f"lr/{k}": v for k, v in result.lrs.items()},
            **{k: v for k, v in result.metrics.items() if k != "loss/total"},
        }
        if result.grad_norm is not None:
            values["grad_norm"] = result.grad_norm
        if trainer.experts.is_dual:
            values["expert/high_noise"] = 1.0 if result.expert == "high_noise" else 0.0
        trainer.metrics.log(values, step=result.step)
        first_lr = next(iter(result.lrs.values()), float("nan"))
        postfix = trainer.progress_postfix
        postfix["loss"] = f"{average:.4f}"
        postfix["lr"] = f"{first_lr:.2e}"
        if trainer.experts.is_dual:
            postfix["expert"] = result.expert
        for key, value in result.feature_metrics.items():
            postfix[key] = f"{value:.4g}"
        if result.skipped:
            postfix["skipped"] = postfix.get("skipped", 0) + 1

    def on_train_end(self, trainer: Any) -> None:
        trainer.metrics.close()

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((float(v) for v in state.get("recent", [])), maxlen=self.window)
