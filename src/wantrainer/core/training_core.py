"""The training loop: ``Trainer.train()`` -> ``train_step()`` -> ``forward_backward()``.

The loop knows flow matching, gradient accumulation, the optimiser step and when to call the handlers
(checkpointing, metrics, validation, sampling) and enhancements; it never names an optional feature.

Flow matching: x_t = (1 - t) * x0 + t * noise, target = noise - x0, the model sees timestep 1000 * t; the model
type's objective (``criteria.objectives``) may then give frames clean and at timestep 0 and mask them out of the
loss (TI2V-5B image-to-video items).
Noise, timesteps and the expert of each step come from the trainer's own seeded generators, so anything else
that draws random numbers (validation, sampling, data loading) never shifts the training trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.logger import get_logger
from ..criteria.objectives import FlowMatchingObjective
from ..criteria.training_loss import flow_matching_pair
from ..enhancements.base import StepContext, StepEnd, feature_metrics
from ..errors import UserError
from ..optimizers import resume_lr_scheduler
from .distributed import DataParallelEngine, sum_across
from .experts import Experts, RegimeSampler
from .signals import StopRequest
from .state import RandomStream, TrainState, global_rng_state, seeded_generator, set_global_rng_state

logger = get_logger(__name__)


def _to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a list of tensors / None, moved to ``device`` in float32."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32)
    if isinstance(value, (list, tuple)):
        return [_to_device(v, device) for v in value]
    return value


class NonFiniteLossError(UserError):
    """Too many consecutive steps had a NaN / Inf loss; the run stops (the last saved files are kept)."""


@dataclass
class TrainGroup:
    """One trained network with its optimiser and learning-rate schedule."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    network: torch.nn.Module | None = None
    experts: tuple[str, ...] = ()
    """The experts whose steps update this group."""
    steps: int = 0


@dataclass
class StepResult:
    """What the last optimiser step did (read by the metrics / progress handlers)."""

    step: int
    expert: str
    loss: float
    grad_norm: float | None
    skipped: bool
    samples: int
    lrs: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    feature_metrics: dict[str, float] = field(default_factory=dict)
    """The enhancements' ``get_<name>_metrics()`` (``<name>/<key>``): logged and shown on the progress bar."""


class Trainer:
    """Runs the loop on parts the builder (``wan_network_trainer``) made."""

    def __init__(
        self,
        *,
        accelerator: Any,
        experts: Experts,
        regimes: RegimeSampler,
        groups: Sequence[TrainGroup],
        loader: Any,
        loss_fn: Any,
        total_steps: int,
        seed: int,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 0.0,
        max_nonfinite_steps: int = 5,
        handlers: Sequence[Any] = (),
        enhancements: Sequence[Any] = (),
        metrics: Any = None,
        cfg: Any = None,
        resume_from: Path | None = None,
        stop: StopRequest | None = None,
        objective: Any = None,
        engine: Any = None,
    ):
        self.accelerator = accelerator
        self.engine = engine or DataParallelEngine(accelerator)
        """How the processes share the work: ``DataParallelEngine`` or ``fsdp.FullyShardedEngine``."""
        self.objective = objective or FlowMatchingObjective()
        """The model type's inputs and loss mask (``criteria.objectives``)."""
        self.experts = experts
        self.regimes = regimes
        self.groups = list(groups)
        self.loader = loader
        self.loss_fn = loss_fn
        self.total_steps = total_steps
        self.grad_accum = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite_steps = max_nonfinite_steps
        self.handlers = list(handlers)
        self.enhancements = list(enhancements)
        self.metrics = metrics
        self.cfg = cfg
        self.resume_from = resume_from
        self.state = TrainState(expert_steps={name: 0 for name in experts.names})
        self.progress_postfix: dict[str, Any] = {}
        self.last_step: StepResult | None = None
        self.stop = stop or StopRequest()
        self.stop_reason = "running"
        """"completed", "interrupted" or "failed" once ``train()`` ends (handlers read it in on_train_end)."""
        self.noise_gen = seeded_generator(seed + 1)
        self.timestep_gen = seeded_generator(seed + 2)
        self.regime_gen = seeded_generator(seed + 3)
        self.model_rng = RandomStream(seed + 4 + 7919 * accelerator.process_index, accelerator.device)
        """The model's own stream (dropouts): see ``RandomStream``; different on every process."""
        self._iter: Iterator[Any] | None = None
        self._epoch_len = len(loader)
        self._data_time = 0.0
        self._hooks_removed = False
        if self._epoch_len == 0:
            raise UserError("the training data loader is empty: check [[datasets.train]] and the caches")
        for group in self.groups:
            self.engine.broadcast_parameters(group.params)

    # ------------------------------------------------------------------ properties used by handlers
    @property
    def model(self) -> torch.nn.Module:
        return self.experts.model

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision, torch.float32)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """The trained network of every group ("default", or "high_noise" / "low_noise" when separate)."""
        return {g.name: g.network for g in self.groups if g.network is not None}

    def call_model(
        self, model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor],
        conditioning: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One forward pass in the run's precision (what training, validation and sampling all use);
        ``conditioning``: the image inputs of the I2V models (``y``, ``clip_fea``), empty for the others."""
        with self.accelerator.autocast():
            return model(x, timestep=timestep, context=context, **(conditioning or {})).float()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self._epoch_len / self.grad_accum)

    def groups_for(self, expert: str) -> list[TrainGroup]:
        return [g for g in self.groups if expert in g.experts]

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Train to ``total_steps``; returns the stop reason ("completed" or "interrupted")."""
        with self.stop.installed():
            return self._train()

    def _train(self) -> str:
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            if self.state.step >= self.total_steps:
                logger.warning(
                    "%s is at step %d and this run has %d steps: training already finished, nothing to do "
                    "(raise max_train_steps / max_train_epochs to continue it)", self.resume_from, self.state.step,
                    self.total_steps,
                )
                self.remove_hooks()
                self.stop_reason = "completed"
                return self.stop_reason
        self.stop_reason = "running"
        self.stop.phase = "training"
        try:
            self._call("on_train_start")
            self._run_steps()
            finished = self.state.step >= self.total_steps
            self.stop_reason = "completed" if finished else "interrupted"
        except BaseException:
            self.stop_reason = "failed"
            raise
        finally:
            self._call("on_train_end")
            self.remove_hooks()
            if self.stop_reason != "failed":
                self.stop.finish()  # the last files are written: a late Ctrl-C changes nothing now
        return self.stop_reason

    def _run_steps(self) -> None:
        empty_epochs = 0
        while self.state.step < self.total_steps:
            micro_batches = self._next_micro_batches()
            if not micro_batches:  # the epoch ended on an optimiser-step boundary the loader's len() missed
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError("the data loader yields no batches although len() says it has some")
                self._end_epoch()
                continue
            empty_epochs = 0
            self.train_step(micro_batches)
            self._call("on_step_end")
            if self.state.batches_in_epoch >= self._epoch_len:
                self._end_epoch()
            if self._stop_agreed():
                logger.warning("stopping at step %d on request", self.state.step)
                return

    def _next_micro_batches(self) -> list[dict[str, Any]]:
        start = time.perf_counter()
        batches: list[dict[str, Any]] = []
        while len(batches) < self.grad_accum and self.state.batches_in_epoch < self._epoch_len:
            if self._iter is None:
                self.loader.set_epoch(self.state.epoch)  # keeps a resumed position within the same epoch
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._epoch_len = self.state.batches_in_epoch
                break
            batches.append(batch)
            self.state.batches_in_epoch += 1
        self._data_time = time.perf_counter() - start
        return batches

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batches_in_epoch = 0
        self._iter = None
        self._epoch_len = len(self.loader)
        self._call("on_epoch_end")

    def _stop_agreed(self) -> bool:
        flag = sum_across([1.0 if self.stop.requested else 0.0], self.device)[0]
        if flag > 0:
            self.stop.requested = True
        return self.stop.requested

    def _call(self, hook: str) -> None:
        for handler in self.handlers:
            getattr(handler, hook)(self)

    def remove_hooks(self) -> None:
        """Every enhancement's ``remove_hooks`` (once): the model and networks are as before ``setup_hooks``."""
        if self._hooks_removed:
            return
        self._hooks_removed = True
        for enh in reversed(self.enhancements):
            enh.remove_hooks()

    # ------------------------------------------------------------------ one optimiser step
    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """Accumulate the micro-batches' gradients, then take one optimiser step (or skip a non-finite one)."""
        step_start = time.perf_counter()
        expert = self.regimes.choose(self.regime_gen)
        self.experts.activate(expert)
        groups = self.groups_for(expert)
        timings = {"data": self._data_time, "forward": 0.0, "backward": 0.0}
        scale = self.grad_accum / len(micro_batches)  # an epoch that ends mid-accumulation keeps the mean
        losses, finite, samples, metrics = [], True, 0, {}
        for batch in micro_batches:
            loss, step_metrics = self.forward_backward(batch, expert, scale, timings)
            finite = finite and bool(torch.isfinite(loss))
            losses.append(float(loss))
            samples += int(batch["latents"].shape[0])
            for key, value in step_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) / len(micro_batches)
        local_loss = sum(losses) / len(losses) if finite else 0.0
        bad, loss_sum, sample_sum = sum_across([0.0 if finite else 1.0, local_loss, samples], self.device)
        opt_start = time.perf_counter()
        grad_norm = None
        if bad == 0:
            grad_norm = self._optimizer_step(groups)
            self.state.nonfinite_in_row = 0
            self.state.expert_steps[expert] = self.state.expert_steps.get(expert, 0) + 1
        else:
            self._skip_step(groups)
        timings["optimizer"] = time.perf_counter() - opt_start
        self.state.step += 1
        if self.state.nonfinite_in_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for {self.state.nonfinite_in_row} steps in a row (max_nonfinite_steps); "
                "stopped without saving, the last saved LoRA / state is kept. Lower learning_rate, set "
                'max_grad_norm, or use mixed_precision = "bf16" instead of fp16'
            )
        updated = tuple(g.name for g in groups) if bad == 0 else ()
        for enh in self.enhancements:
            enh.on_step_end(StepEnd(self.state, expert, bad > 0, updated))
        feature = {k: v for enh in self.enhancements for k, v in feature_metrics(enh).items()}
        timings["step"] = time.perf_counter() - step_start + self._data_time
        result = StepResult(
            step=self.state.step,
            expert=expert,
            loss=loss_sum / self.world_size if bad == 0 else float("nan"),
            grad_norm=grad_norm,
            skipped=bad > 0,
            samples=int(sample_sum),
            lrs=self.current_lrs(),
            timings=timings,
            metrics={**metrics, **feature},
            feature_metrics=feature,
        )
        self.last_step = result
        if self.experts.is_dual:
            logger.info("step %d trained the %s expert (loss %.4f)", result.step, expert, result.loss)
        return result

    def forward_backward(
        self, batch: dict[str, Any], expert: str, scale: float = 1.0, timings: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Noise one micro-batch, predict the flow, compute the loss and (when finite) backpropagate it."""
        timings = timings if timings is not None else {"forward": 0.0, "backward": 0.0}
        with self.model_rng.active():
            return self._forward_backward(batch, expert, scale, timings)

    def _forward_backward(
        self, batch: dict[str, Any], expert: str, scale: float, timings: dict[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        start = time.perf_counter()
        batch = self._to_device(batch)
        for enh in self.enhancements:
            batch = enh.modify_inputs(batch)
        ctx = self._noised_inputs(batch, expert)
        ctx.backward = lambda term: self.accelerator.backward(term * scale)
        for enh in self.enhancements:
            enh.modify_noised(ctx)
        if not any(enh.replaces_training_loss for enh in self.enhancements):
            ctx.pred = self.call_model(self.model, ctx.noisy, ctx.timesteps, batch["text_embeds"],
                                       batch.get("conditioning"))
        loss, metrics = self.compute_loss(ctx)
        self._sync_device()
        timings["forward"] += time.perf_counter() - start
        if torch.isfinite(loss) and loss.requires_grad:  # terms that ran their own ctx.backward are detached
            start = time.perf_counter()
            self.accelerator.backward(loss * scale)
            self._sync_device()
            timings["backward"] += time.perf_counter() - start
        return loss.detach(), metrics

    def compute_loss(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The training criterion (its element loss weighted by the product of the enhancements' ``loss_weight``)
        plus every enhancement's term; all share one call shape. Without a prediction (an enhancement
        ``replaces_training_loss``) only the enhancements' terms count."""
        if ctx.pred is None:
            loss, metrics = torch.zeros((), device=self.device), {}
        else:
            for enh in self.enhancements:
                weight = enh.loss_weight(ctx)
                if weight is not None:
                    ctx.element_weight = weight if ctx.element_weight is None else ctx.element_weight * weight
            loss, metrics = self.loss_fn(ctx.pred, ctx.target, ctx.batch, ctx)
            metrics = {k: float(v) for k, v in dict(metrics or {}).items()}
        for enh in self.enhancements:
            extra, extra_metrics = enh.loss(ctx)
            if extra is not None:
                loss = loss + extra
            metrics.update({k: float(v) for k, v in (extra_metrics or {}).items()})
        return loss, metrics

    def _noised_inputs(self, batch: dict[str, Any], expert: str) -> StepContext:
        latents = batch["latents"]  # [B, C, F, H, W]
        b = latents.shape[0]
        patch = self.model.config.patch_size
        seq_len = (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])  # tokens per latent frame
        # Draw for the global batch and keep this process's slice: N processes x B == 1 process x N*B.
        lo, hi = self.rank * b, (self.rank + 1) * b
        t = self.regimes.sample(expert, b * self.world_size, self.timestep_gen, seq_len=seq_len)[lo:hi]
        noise = torch.randn((b * self.world_size, *latents.shape[1:]), generator=self.noise_gen)[lo:hi]
        t = t.to(self.device, torch.float32)
        noise = noise.to(self.device, latents.dtype)
        noisy, target = flow_matching_pair(latents, noise, t)
        inputs = self.objective.model_inputs(latents, noisy, t * 1000.0, batch, self.state.epoch, patch)
        return StepContext(
            batch=batch,
            latents=latents,
            noise=noise,
            noisy=inputs.noisy,
            target=target,
            t=t,
            timesteps=inputs.timesteps,
            loss_mask=inputs.loss_mask,
            model=self.model,
            network=self.experts.network_for(expert),
            expert=expert,
            step=self.state.step,
            forward=self.call_model,
        )

    def _optimizer_step(self, groups: list[TrainGroup]) -> float:
        params = [p for g in groups for p in g.params]
        self.engine.average_gradients(params)
        norm = self.engine.clip_grad_norm(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        for group in groups:
            group.optimizer.step()
            group.scheduler.step()
            group.steps += 1
        self._zero_grad()
        return norm

    def _skip_step(self, groups: list[TrainGroup]) -> None:
        self._zero_grad()
        self.state.nonfinite_in_row += 1
        logger.warning(
            "step %d skipped: non-finite loss (%d in a row, the limit is %d)",
            self.state.step + 1,
            self.state.nonfinite_in_row,
            self.max_nonfinite_steps,
        )

    def _zero_grad(self) -> None:
        for group in self.groups:
            group.optimizer.zero_grad(set_to_none=True)
            for p in group.params:
                p.grad = None

    def current_lrs(self) -> dict[str, float]:
        """Learning rate of every parameter group: ``group0`` ... (prefixed by the network name if several)."""
        lrs = {}
        for group in self.groups:
            prefix = "" if len(self.groups) == 1 else f"{group.name}/"
            for i, pg in enumerate(group.optimizer.param_groups):
                lrs[f"{prefix}group{i}"] = float(pg["lr"])
        return lrs

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        out["latents"] = batch["latents"].to(self.device, torch.float32)
        out["text_embeds"] = [e.to(self.device, torch.float32) for e in batch["text_embeds"]]
        if "loss_weight" in batch:
            out["loss_weight"] = batch["loss_weight"].to(self.device, torch.float32)
        if "conditioning" in batch:
            out["conditioning"] = {k: v.to(self.device, torch.float32) for k, v in batch["conditioning"].items()}
        if "item_extras" in batch:
            out["item_extras"] = {k: _to_device(v, self.device) for k, v in batch["item_extras"].items()}
        return out

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly: counters, networks, optimisers, RNGs, data position.
        Under FSDP the networks and optimisers are sharded: ``write_shards`` saves them (every process)."""
        sharded = self.engine.sharded
        return {
            "world_size": self.world_size,
            "engine": self.engine.name,
            "state": self.state.state_dict(),
            "networks": {} if sharded else {g.name: g.network.state_dict() for g in self.groups if g.network is not None},
            "optimizers": {} if sharded else {g.name: g.optimizer.state_dict() for g in self.groups},
            "schedulers": {g.name: g.scheduler.state_dict() for g in self.groups},
            "group_steps": {g.name: g.steps for g in self.groups},
            "handlers": {getattr(h, "name", type(h).__name__): h.state_dict() for h in self.handlers},
            "enhancements": {e.name: e.state_dict() for e in self.enhancements if hasattr(e, "state_dict")},
            "rank": {
                "rng": global_rng_state(),
                "generators": {
                    "noise": self.noise_gen.get_state(),
                    "timestep": self.timestep_gen.get_state(),
                    "regime": self.regime_gen.get_state(),
                    "model": self.model_rng.state_dict(),
                },
                "loader": self.loader.state_dict(),
                "batches_in_epoch": self.state.batches_in_epoch,
            },
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state.load_state_dict(sd["state"])
        for group in self.groups:
            if not self.engine.sharded:  # sharded: ``load_checkpoint`` read them with ``engine.load_shards``
                if group.network is not None:
                    group.network.load_state_dict(sd["networks"][group.name])
                group.optimizer.load_state_dict(sd["optimizers"][group.name])
            resume_lr_scheduler(group.scheduler, sd["schedulers"][group.name])  # the config's schedule, saved step
            group.steps = int(sd.get("group_steps", {}).get(group.name, 0))
        for handler in self.handlers:
            name = getattr(handler, "name", type(handler).__name__)
            if name in sd.get("handlers", {}):
                handler.load_state_dict(sd["handlers"][name])
        for enh in self.enhancements:
            if enh.name in sd.get("enhancements", {}) and hasattr(enh, "load_state_dict"):
                enh.load_state_dict(sd["enhancements"][enh.name])
        rank = sd["rank"]
        set_global_rng_state(rank["rng"])
        self.noise_gen.set_state(rank["generators"]["noise"])
        self.timestep_gen.set_state(rank["generators"]["timestep"])
        self.regime_gen.set_state(rank["generators"]["regime"])
        if "model" in rank["generators"]:
            self.model_rng.load_state_dict(rank["generators"]["model"])
        self.loader.load_state_dict(rank["loader"])
        self.state.batches_in_epoch = int(rank["batches_in_epoch"])
        self._iter = None
        self._epoch_len = len(self.loader)

    def write_shards(self, folder: Path) -> None:
        """The sharded part of a state folder (FSDP: trained weights and optimiser state; every process calls
        it); nothing for the other engines, whose ``state_dict`` holds them."""
        if self.engine.sharded:
            self.engine.save_shards(folder, [g.optimizer for g in self.groups])

    def _check_resumable(self, sd: dict[str, Any], folder: Path) -> None:
        """A ``UserError`` naming the options when the saved networks do not fit the ones this config built."""
        saved_engine = sd.get("engine", "ddp")
        if saved_engine != self.engine.name:
            raise UserError(
                f"`resume`: {folder} was saved with distributed_engine = \"{saved_engine}\" and this run uses "
                f"\"{self.engine.name}\" ({self.world_size} process(es)); resume with the engine and process count "
                "of the run that saved it"
            )
        if self.engine.sharded:
            return  # the shards' names and shapes are checked by torch.distributed.checkpoint when loading
        saved, own = sd["networks"], self.networks
        if set(saved) != set(own):
            raise UserError(
                f"`resume`: {folder} holds the network(s) {sorted(saved)}, this config trains {sorted(own)}; "
                "dit / dit_high_noise and dual_lora_mode must be those of the run that saved it"
            )
        for name, network in own.items():
            expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
            found = {k: tuple(v.shape) for k, v in saved[name].items()}
            if expected != found:
                diff = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
                key = diff[0]
                raise UserError(
                    f"`resume`: the LoRA in {folder} does not fit this config (e.g. {key}: saved "
                    f"{list(found.get(key, ()))}, this config {list(expected.get(key, ()))}); network_dim and "
                    "network_args must be those of the run that saved it"
                )

    def load_checkpoint(self, folder: Path) -> None:
        from .checkpoint_io import read_state_folder, state_from_payload

        payload = read_state_folder(folder, self.rank, self.world_size)
        sd = state_from_payload(payload, self.rank)
        self._check_resumable(sd, folder)
        try:
            if self.engine.sharded:
                self.engine.load_shards(folder, [g.optimizer for g in self.groups])
            self.load_state_dict(sd)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"`resume`: {folder} does not fit this config ({str(exc).splitlines()[0]}); the optimiser "
                "settings (optimizer_type, loraplus_lr_ratio) must be those of the run that saved it"
            ) from None
        logger.info("resumed from %s at step %d (epoch %d)", folder, self.state.step, self.state.epoch)
