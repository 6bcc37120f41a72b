"""Validation loss on ``[[datasets.val]]`` at fixed timesteps (``validation_timesteps``).

Every evaluation sees the same inputs: the val loader does not shuffle, captions are never dropped, and each
batch's noise comes from its own generator seeded with ``seed + batch index``, drawn for the global batch
(under DDP each process keeps the slice of its share, so N processes measure what one process measures).
Under DDP the val loader keeps every item: a short last batch that does not divide by the processes is split
unevenly (some processes get fewer items or none); the loop has no collectives, and the per-process sums and
sample counts are added up once at the end, a sample-weighted mean equal to the single-process loss. The loss is the training
objective (flow matching: input ``(1 - t) * x0 + t * noise``, target ``noise - x0``, model timestep
``1000 * t``) through the same
``TrainingLoss`` call shape, without the per-timestep weighting, so the numbers of different timesteps and
runs compare. The model type's objective applies as in training (``criteria.objectives``: TI2V-5B image-to-video
items drawn from the validation seed, the same items on every evaluation). With Wan 2.2 experts each timestep is served by its own expert (timesteps are grouped so each
expert is activated once). Nothing here touches the training random stream (see ``inference_session``).

Logged: ``val/loss`` (mean over the timesteps) and ``val/loss_t{t}``; the progress bar shows ``val``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ...common.logger import get_logger
from ...config.output import ValidationConfig
from ...criteria.objectives import FlowMatchingObjective, objective_for
from ...criteria.training_loss import LossContext, TrainingLoss, flow_matching_pair
from ...errors import UserError
from ..distributed import sum_across
from .base import Handler, evaluation_variants
from .inference import inference_session

logger = get_logger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
"""(noisy latents, timesteps 0..1000, text contexts, image conditioning (empty for T2V)) -> prediction."""

VAL_NOISE_SEED = 20_240_917
"""Default base seed of the validation noise (independent of the training seed)."""


def group_by_expert(timesteps: Sequence[int], expert_for: Callable[[float], str] | None) -> list[tuple[str | None, list[int]]]:
    """Timesteps grouped by the expert that serves them, in first-seen order (one group without experts)."""
    if expert_for is None:
        return [(None, list(timesteps))]
    groups: dict[str, list[int]] = {}
    for t in timesteps:
        groups.setdefault(expert_for(t / 1000.0), []).append(t)
    return list(groups.items())


def batch_noise(shape: torch.Size, seed: int, batch_index: int, offset: int = 0,
                global_size: int | None = None) -> torch.Tensor:
    """The fixed noise of one validation batch (float32, drawn on the CPU).

    ``shape`` is this process's share, starting at sample ``offset`` of a global batch of ``global_size``
    samples (default: the share is the whole batch); the noise is drawn for the global batch and the share's
    slice returned.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed + batch_index)
    size = shape[0]
    total = size if global_size is None else global_size
    noise = torch.randn((total, *shape[1:]), generator=generator, dtype=torch.float32)
    return noise[offset:offset + size]


def _share(batch: dict[str, Any], position: int, size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(batch index, offset, global size) of a batch: as the loader records it, else ``world_size`` equal shares."""
    if "batch_index" in batch:
        return batch["batch_index"], batch["share_offset"], batch["global_batch_size"]
    return position, rank * size, size * world_size


@torch.no_grad()
def validation_losses(
    forward: Forward,
    batches: Callable[[], Iterable[dict[str, Any]]],
    timesteps: Sequence[int],
    loss_fn: Callable,
    *,
    seed: int,
    device: torch.device | str,
    expert_for: Callable[[float], str] | None = None,
    activate: Callable[[str], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    objective: Any = None,
    patch: tuple[int, int, int] = (1, 2, 2),
) -> dict[int, tuple[float, int]]:
    """Sum of per-sample-weighted losses and sample count per timestep: ``{t: (loss_sum, count)}``.

    ``batches()`` returns a fresh pass over the validation batches (called once per expert group). A batch's
    place in the global batch comes from its ``batch_index`` / ``share_offset`` / ``global_batch_size`` (see
    ``dataset.loader``); without them it is taken as ``rank``'s equal share of ``world_size``.
    """
    objective = objective or FlowMatchingObjective()
    sums = {t: (0.0, 0) for t in timesteps}
    for expert, group in group_by_expert(timesteps, expert_for):
        if expert is not None and activate is not None:
            activate(expert)
        for batch_index, batch in enumerate(batches()):
            latents = batch["latents"].to(device=device, dtype=torch.float32)
            index, offset, total = _share(batch, batch_index, latents.shape[0], rank, world_size)
            noise = batch_noise(latents.shape, seed, index, offset, total).to(device)
            context = [c.to(device) for c in batch["text_embeds"]]
            conditioning = {k: v.to(device) for k, v in batch.get("conditioning", {}).items()}
            size = latents.shape[0]
            for t in group:
                t_b = torch.full((size,), t / 1000.0, device=device, dtype=torch.float32)
                noisy, target = flow_matching_pair(latents, noise, t_b)
                inputs = objective.model_inputs(latents, noisy, t_b * 1000.0, batch, 0, patch)
                pred = forward(inputs.noisy, inputs.timesteps, context, conditioning)
                loss, _ = loss_fn(pred, target, batch, LossContext(t=t_b, loss_mask=inputs.loss_mask))
                loss_sum, count = sums[t]
                sums[t] = (loss_sum + float(loss) * size, count + size)
    return sums


class ValidationHandler(Handler):
    """Computes the validation loss on the triggers of the ``validation`` section."""

    name = "validation"

    def __init__(self, cfg: ValidationConfig, loader: Any, loss_fn: Callable, seed: int = VAL_NOISE_SEED,
                 objective: Any = None):
        self.cfg = cfg
        self.objective = objective or FlowMatchingObjective()
        self.loader = loader
        self.loss_fn = loss_fn
        self.seed = seed
        self.timesteps = list(dict.fromkeys(cfg.validation_timesteps))
        self.last: dict[str, float] = {}
        self._last_step: int | None = None

    @classmethod
    def from_config(cls, cfg: ValidationConfig, val_specs: list, loss_cfg, timestep_cfg, *, rank: int = 0,
                    world_size: int = 1, model_type: str = "t2v", ti2v_image_ratio: float | None = None
                    ) -> ValidationHandler | None:  # fmt: skip
        """None when there is nothing to do; a ``UserError`` when a trigger is set without val datasets."""
        triggered = cfg.validate_every_n_steps is not None or cfg.validate_on_epoch_end
        if not val_specs:
            if triggered:
                raise UserError(
                    "`validate_every_n_steps` / `validate_on_epoch_end` are set but there is no [[datasets.val]]: "
                    "add a validation dataset (and cache it) or remove the trigger"
                )
            return None
        if not triggered:
            logger.warning("[[datasets.val]] is set but no trigger: set `validate_every_n_steps` or "
                           "`validate_on_epoch_end` to compute the validation loss")
            return None
        from ...dataset.loader import build_dataloader

        loader = build_dataloader(val_specs, seed=0, shuffle=False, rank=rank, world_size=world_size,
                                  split_uneven=True, model_type=model_type)
        unweighted = timestep_cfg.model_copy(update={"weighting_scheme": "none"})
        objective = objective_for(model_type, ti2v_image_ratio, VAL_NOISE_SEED)
        return cls(cfg, loader, TrainingLoss.from_config(loss_cfg, unweighted), objective=objective)

    # -- triggers --------------------------------------------------------------------------------

    def on_step_end(self, trainer: Any) -> None:
        every = self.cfg.validate_every_n_steps
        if every and trainer.state.step % every == 0:
            self.run(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        if self.cfg.validate_on_epoch_end:
            self.run(trainer)

    # -- evaluation ------------------------------------------------------------------------------

    def _batches(self) -> Iterable[dict[str, Any]]:
        self.loader.load_state_dict({"epoch": 0, "position": 0})  # from the start, also after an interrupted pass
        return iter(self.loader)

    def local_sums(self, trainer: Any) -> dict[int, tuple[float, int]]:
        """This process's ``{t: (loss_sum, count)}`` for the current weights (no collectives)."""
        experts = trainer.experts
        model = experts.model
        dual = experts.is_dual
        with inference_session(trainer):
            sums = validation_losses(
                lambda x, t, ctx, conditioning=None: trainer.call_model(model, x, t, ctx, conditioning),
                self._batches,
                self.timesteps,
                self.loss_fn,
                seed=self.seed,
                device=trainer.device,
                expert_for=experts.expert_for_t if dual else None,
                activate=experts.activate if dual else None,
                rank=getattr(self.loader, "rank", 0),
                world_size=getattr(self.loader, "world_size", 1),
                objective=self.objective,
                patch=tuple(model.config.patch_size),
            )
        return sums

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """The validation metrics for the current weights (no logging): one reduction of the sums and counts."""
        sums = self.local_sums(trainer)
        flat = sum_across([v for t in self.timesteps for v in sums[t]], trainer.device)
        per_t = {t: flat[2 * i] / max(flat[2 * i + 1], 1.0) for i, t in enumerate(self.timesteps)}
        metrics = {f"val/loss_t{t}": value for t, value in per_t.items()}
        metrics["val/loss"] = sum(per_t.values()) / len(per_t)
        return metrics

    def run(self, trainer: Any) -> dict[str, float]:
        step = trainer.state.step
        if self._last_step == step and self.last:
            return self.last  # step and epoch triggers on the same step: evaluate once
        metrics = self.evaluate(trainer)
        for variant in evaluation_variants(trainer, "validation"):  # e.g. the EMA weights: val_ema/loss, ...
            with variant.applied():
                metrics.update({k.replace("val/", f"val_{variant.label}/", 1): v
                                for k, v in self.evaluate(trainer).items()})
        self.last, self._last_step = metrics, step
        trainer.metrics.log(metrics, step=step)
        trainer.progress_postfix["val"] = f"{metrics['val/loss']:.4f}"
        detail = ", ".join(f"t{t}={metrics[f'val/loss_t{t}']:.4f}" for t in self.timesteps)
        logger.info("step %d: validation loss %.5f (%s)", step, metrics["val/loss"], detail)
        for key in metrics:
            if key.endswith("/loss") and key != "val/loss":
                logger.info("step %d: validation loss %.5f with the %s weights", step, metrics[key],
                            key[len("val_"):-len("/loss")])
        return metrics
