"""Concept sliders: the text-slider objective of Gandikota et al., "Concept Sliders" (2023), eq. 6, with an optional
neutral prompt as ai-toolkit / Takenoko's slider has.

On every micro-batch, on the noisy latents x_t and timesteps t of the step (``slider_latents = "dataset"``: the
batch's latents noised as for the training loss; ``"noise"``: Gaussian noise in place of the latents), for the pair
of the step (the ``[[slider_pairs]]`` tables in turn) and with the base model (LoRA off, no grad):

    d      = eps(x_t, t, positive) - eps(x_t, t, negative)
    base   = eps(x_t, t, neutral)                 (neutral defaults to the target prompt)
    loss   = 1/2 * mse(eps_{+1}(x_t, t, target), base + eta * d) + 1/2 * mse(eps_{-1}(x_t, t, target), base - eta * d)

where eps_{m} is the model with the LoRA at multiplier m and eta = ``slider_guidance_strength``. Unlike
Takenoko, the targets are not re-normalised to the neutral prediction's mean and std, and there is no anchor
term. There is no flow-matching loss on the dataset (``replaces_training_loss``: the trainer skips its forward
pass): a slider learns a direction, not the dataset. The LoRA file is an ordinary LoRA: in ComfyUI its strength is the multiplier (-1 .. +1 and beyond).
Samples during training are made at +1 (the plain names) and also at 0 and -1 (``-zero`` / ``-minus1``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...common.logger import get_logger
from ...criteria.training_loss import masked_per_sample_mean
from ..base import (
    BaseEnhancement,
    EvaluationVariant,
    PromptSet,
    RunContext,
    StepContext,
    load_prompt_set,
    network_disabled,
)
from ..registry import register
from .config import SliderConfig

logger = get_logger(__name__)

PROMPTS_FILE = "_wtslider_prompts.safetensors"
ROLES = ("target", "positive", "negative", "neutral")


def slider_targets(eps_pos: torch.Tensor, eps_neg: torch.Tensor, eps_neutral: torch.Tensor, eta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The +1 and -1 targets: ``neutral +- eta * (positive - negative)``."""
    direction = eps_pos - eps_neg
    return eps_neutral + eta * direction, eps_neutral - eta * direction


@register("slider")
class SliderHelper(BaseEnhancement):
    """``[[slider_pairs]]``: the slider objective of the module docstring."""

    replaces_training_loss = True

    def __init__(self, cfg: SliderConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.networks: dict[str, Any] = {}
        self.embeds: dict[str, torch.Tensor] = {}
        self.rank = 0
        self.world_size = 1
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> SliderHelper | None:
        section: SliderConfig = cfg.slider
        return cls(section, cfg.training.seed) if section.slider_pairs else None

    def prompt_set(self) -> PromptSet:
        prompts = {}
        for i, pair in enumerate(self.cfg.slider_pairs):
            for role in ROLES:
                text = getattr(pair, role)
                prompts[f"p{i}_{role}"] = pair.target if text is None else text
        return PromptSet(PROMPTS_FILE, prompts)

    def text_cache_prompts(self) -> list[PromptSet]:
        return [self.prompt_set()]

    def setup_hooks(self, run: RunContext) -> None:
        self.embeds = {k: v.to(run.device) for k, v in load_prompt_set(run.cfg, self.prompt_set()).items()}
        self.networks = run.networks
        self.rank = run.accelerator.process_index if run.accelerator is not None else 0
        self.world_size = run.accelerator.num_processes if run.accelerator is not None else 1
        logger.info("concept slider: %d prompt pair(s), guidance strength %g, on %s latents",
                    len(self.cfg.slider_pairs), self.cfg.slider_guidance_strength, self.cfg.slider_latents)

    def _inputs(self, ctx: StepContext) -> torch.Tensor:
        if self.cfg.slider_latents == "dataset":
            return ctx.noisy
        # Gaussian "latents" in place of the data, drawn for the global batch from (seed, step, batch position) and
        # sliced as the trainer slices its noise: the same on resume and for N processes x B as for 1 x N*B.
        b = ctx.latents.shape[0]
        index = int(ctx.batch.get("batch_index", 0))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step * 7919 + index)
        lo = int(ctx.batch.get("share_offset", self.rank * b))
        total = int(ctx.batch.get("global_batch_size", b * self.world_size))
        fake = torch.randn((total, *ctx.latents.shape[1:]), generator=gen)[lo:lo + b].to(ctx.noise)
        t = ctx.t.view(-1, *([1] * (fake.ndim - 1)))
        return (1.0 - t) * fake + t * ctx.noise

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        pair = ctx.step % len(self.cfg.slider_pairs)
        b = ctx.noisy.shape[0]
        x = self._inputs(ctx)
        prompt = {role: [self.embeds[f"p{pair}_{role}"]] * b for role in ROLES}
        with torch.no_grad(), ctx.network_disabled():
            roles = ("positive", "negative", "neutral")
            eps = ctx.predict(x.repeat(3, *([1] * (x.ndim - 1))), timesteps=ctx.timesteps.repeat(3),
                              text_embeds=[e for r in roles for e in prompt[r]],
                              conditioning=_repeat(ctx.batch.get("conditioning"), 3))
            eps_pos, eps_neg, eps_neutral = eps.chunk(3)
            up, down = slider_targets(eps_pos, eps_neg, eps_neutral, self.cfg.slider_guidance_strength)
        terms = {}
        network = ctx.network
        for name, multiplier, target in (("plus", 1.0, up), ("minus", -1.0, down)):
            with _multiplier(network, multiplier):
                pred = ctx.predict(x, text_embeds=prompt["target"])
                term = 0.5 * masked_per_sample_mean((pred.float() - target.float()).square(), ctx.loss_mask).mean()
                ctx.backward(term)  # now: gradient checkpointing recomputes with this multiplier
            terms[name] = float(term.detach())
        loss = torch.tensor(terms["plus"] + terms["minus"], device=ctx.noisy.device)
        self.last = {"loss": float(loss), "direction": float((eps_pos - eps_neg).square().mean())}
        return loss, {"slider/loss": loss, "slider/loss_plus": terms["plus"], "slider/loss_minus": terms["minus"]}

    def get_slider_metrics(self) -> dict[str, float]:
        return {"loss": self.last.get("loss", 0.0)}

    def evaluation_variants(self, purpose: str) -> list[EvaluationVariant]:
        if purpose != "sampling" or not self.networks:
            return []
        return [EvaluationVariant("zero", lambda: self._all_at(0.0)), EvaluationVariant("minus1", lambda: self._all_at(-1.0))]

    @contextlib.contextmanager
    def _all_at(self, multiplier: float) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for network in self.networks.values():
                stack.enter_context(network_disabled(network) if multiplier == 0.0 else _multiplier(network, multiplier))
            yield


@contextlib.contextmanager
def _multiplier(network: Any, multiplier: float) -> Iterator[None]:
    saved = network.multiplier
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        network.set_multiplier(saved)


def _repeat(conditioning: dict[str, torch.Tensor] | None, times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(times, *([1] * (v.ndim - 1))) for k, v in (conditioning or {}).items()}
