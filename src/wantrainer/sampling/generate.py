"""Text-to-video denoising with diffusers' flow-matching schedulers.

The DiT is reached only through a callable ``model_fn(latents [B,16,F,H,W], timestep [B] in 0..1000,
context list[Tensor[L, D]]) -> flow prediction [B,16,F,H,W]``, so a caller can swap Wan 2.2 experts at the
boundary (``ExpertSwitch``), keep a LoRA applied, or run the model under its own precision and device rules.

Latents stay in float32 on the compute device for the whole loop; the starting noise is drawn on the CPU from
the prompt's seed, so a seed gives the same video on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..common.logger import get_logger

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

logger = get_logger(__name__)

ModelFn = Callable[..., torch.Tensor]
"""``(latents, timestep, context, **conditioning) -> prediction``; ``conditioning`` holds the image inputs of the
I2V models (``y``, ``clip_fea``; see ``sampling.conditioning.bind``), nothing for T2V."""

LATENT_CHANNELS = 16
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8
NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "euler")


@dataclass(frozen=True)
class GenerationSettings:
    """What one sample needs besides the model and the text embeddings (mirrors ``[[sample_prompts]]``)."""

    width: int
    height: int
    frames: int
    seed: int
    steps: int
    cfg_scale: float
    flow_shift: float
    solver: str = "unipc"

    @classmethod
    def from_prompt(cls, prompt: object) -> GenerationSettings:
        """Build from a ``SamplePrompt`` (config section)."""
        return cls(
            width=prompt.width,  # type: ignore[attr-defined]
            height=prompt.height,  # type: ignore[attr-defined]
            frames=prompt.frames,  # type: ignore[attr-defined]
            seed=prompt.seed,  # type: ignore[attr-defined]
            steps=prompt.steps,  # type: ignore[attr-defined]
            cfg_scale=prompt.cfg_scale,  # type: ignore[attr-defined]
            flow_shift=prompt.discrete_flow_shift,  # type: ignore[attr-defined]
            solver=prompt.sample_solver,  # type: ignore[attr-defined]
        )

    @property
    def uses_cfg(self) -> bool:
        """Classifier-free guidance needs a second (negative) pass unless the scale is exactly 1."""
        return self.cfg_scale != 1.0


def latent_shape(width: int, height: int, frames: int, channels: int = LATENT_CHANNELS,
                 stride: int = VAE_SPATIAL_STRIDE) -> tuple[int, int, int, int]:  # fmt: skip
    """[C, F, H, W] of the latents of ``frames`` frames at ``width`` x ``height``: the Wan 2.1 VAE (16 channels,
    8x) by default, the Wan 2.2 VAE of TI2V-5B with ``channels=48, stride=16``."""
    if (frames - 1) % VAE_TEMPORAL_STRIDE != 0:
        raise ValueError(f"frames must be 4k+1, got {frames}")
    if width % (2 * stride) or height % (2 * stride):
        raise ValueError(f"width and height must be multiples of {2 * stride}, got {width}x{height}")
    return (channels, (frames - 1) // VAE_TEMPORAL_STRIDE + 1, height // stride, width // stride)


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise [1, *shape] in float32, drawn on the CPU from its own generator."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)


def make_scheduler(solver: str, flow_shift: float) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """A fresh flow-matching scheduler, configured as diffusers' Wan pipeline configures it. (diffusers is imported
    here, not with the module: a training run that never samples does not pay its ~90 MB and ~2 s.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            flow_shift=flow_shift,
        )
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=flow_shift)
    raise ValueError(f"unknown sample_solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def _contexts(context: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(context) if isinstance(context, (list, tuple)) else [context]


def guided_prediction(
    model_fn: ModelFn,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor | list[torch.Tensor],
    negative_context: torch.Tensor | list[torch.Tensor] | None,
    cfg_scale: float,
) -> torch.Tensor:
    """One flow prediction with classifier-free guidance: uncond + scale * (cond - uncond). ``context``: one
    prompt's embeddings [L, D], or a list with one per batch item."""
    cond = model_fn(latents, timestep, _contexts(context)).float()
    if negative_context is None or cfg_scale == 1.0:
        return cond
    uncond = model_fn(latents, timestep, _contexts(negative_context)).float()
    return uncond + cfg_scale * (cond - uncond)


Step = tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
"""One solver step: (the model's timestep for it, ``advance(prediction, latents) -> latents``)."""


def denoise(
    model_fn: ModelFn,
    latents: torch.Tensor,
    steps: Sequence[Step],
    context: torch.Tensor | list[torch.Tensor],
    negative_context: torch.Tensor | list[torch.Tensor] | None = None,
    cfg_scale: float = 1.0,
    *,
    keep: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """The project's one denoising loop: for each step, the (guided) flow prediction at its timestep, then the
    solver's update. ``keep``: 1 where the latents are denoised, 0 where the model input holds ``fixed`` instead
    (a given clean first frame). Sampling runs it over a diffusers scheduler's steps (``generate_latents``),
    self-correction over a short per-item Euler stretch (``flow_euler_steps``)."""
    for index, (timestep, advance) in enumerate(steps):
        model_input = latents if keep is None else (1 - keep) * fixed + keep * latents
        prediction = guided_prediction(model_fn, model_input, timestep, context, negative_context, cfg_scale)
        latents = advance(prediction, latents).float()
        if on_step is not None:
            on_step(index, float(timestep.max()))
    return latents


def flow_euler_steps(sigmas: torch.Tensor, timestep_for: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> list[Step]:  # fmt: skip
    """Euler steps of the flow ODE along per-item noise levels ``sigmas`` [K + 1, B] in [0, 1] (decreasing):
    x <- x + (sigma_{k+1} - sigma_k) * v(x, 1000 sigma_k), as diffusers' ``FlowMatchEulerDiscreteScheduler`` steps.
    ``timestep_for(sigma [B]) -> timestep`` (default 1000 sigma) may give per-token timesteps."""
    timestep_for = timestep_for or (lambda sigma: sigma * NUM_TRAIN_TIMESTEPS)
    steps: list[Step] = []
    for k in range(sigmas.shape[0] - 1):
        delta = (sigmas[k + 1] - sigmas[k]).view(-1, 1, 1, 1, 1)

        def advance(prediction: torch.Tensor, latents: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
            return latents + delta.to(latents) * prediction

        steps.append((timestep_for(sigmas[k]), advance))
    return steps


@torch.no_grad()
def generate_latents(
    model_fn: ModelFn,
    context: torch.Tensor,
    negative_context: torch.Tensor | None,
    settings: GenerationSettings,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    *,
    channels: int = LATENT_CHANNELS,
    stride: int = VAE_SPATIAL_STRIDE,
    first_frame: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise from the seed's noise to clean latents [1, C, F, H/s, W/s] (float32, on ``device``).

    ``context`` / ``negative_context`` are one prompt's text embeddings [L, D]; with ``cfg_scale == 1`` the
    negative pass is skipped (``negative_context`` may then be None). ``on_step(index, timestep)`` is called
    after each solver step. ``first_frame`` (TI2V-5B image-to-video): the image's clean latents [1, C, 1, h, w],
    which replace the first latent frame of every model input, whose tokens get timestep 0 (per-token
    timesteps, as Wan 2.2's reference and diffusers' ``expand_timesteps`` do).
    """
    if settings.uses_cfg and negative_context is None:
        raise ValueError("cfg_scale != 1 needs a negative_context (the encoded negative prompt, may be empty)")
    device = torch.device(device)
    shape = latent_shape(settings.width, settings.height, settings.frames, channels, stride)
    latents = initial_noise(shape, settings.seed).to(device)
    keep = None  # 1 where the latents are denoised, 0 on the given first frame
    if first_frame is not None:
        first_frame = first_frame.to(device, torch.float32)
        keep = torch.ones_like(latents)
        keep[:, :, 0] = 0
    scheduler = make_scheduler(settings.solver, settings.flow_shift)
    scheduler.set_timesteps(settings.steps, device=device)
    context = context.to(device)
    negative = negative_context.to(device) if (settings.uses_cfg and negative_context is not None) else None
    steps: list[Step] = []
    for t in scheduler.timesteps:
        timestep = t.to(device=device, dtype=torch.float32).expand(latents.shape[0])
        if keep is not None:
            timestep = (keep[:1, 0, :, ::2, ::2] * timestep[0]).flatten(1).expand(latents.shape[0], -1)  # [B, L]

        def advance(prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
            return scheduler.step(prediction, t, x, return_dict=False)[0]

        steps.append((timestep, advance))
    latents = denoise(model_fn, latents, steps, context, negative, settings.cfg_scale, keep=keep, fixed=first_frame,
                      on_step=on_step)
    if keep is not None:
        latents = (1 - keep) * first_frame + keep * latents
    return latents


def boundary_timestep(value: float | None, default: float = 875.0) -> float:
    """Normalise ``timestep_boundary`` (875 or 0.875) to the 0..1000 timestep scale."""
    if value is None:
        return default
    return float(value) * NUM_TRAIN_TIMESTEPS if value <= 1.0 else float(value)


@dataclass
class ExpertSwitch:
    """A ``ModelFn`` that routes each step to the Wan 2.2 expert for its timestep.

    Timesteps at or above ``boundary`` (0..1000 scale) go to ``high``, the rest to ``low`` (as diffusers'
    Wan 2.2 pipeline does). ``on_switch(name)`` runs when the active expert changes (e.g. to move weights
    between CPU and GPU). ``history`` records which expert served each call, as ``(name, timestep)``.
    """

    high: ModelFn
    low: ModelFn
    boundary: float
    on_switch: Callable[[str], None] | None = None
    history: list[tuple[str, float]] = field(default_factory=list)
    active: str | None = None

    def expert_for(self, timestep: float) -> str:
        return "high" if timestep >= self.boundary else "low"

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor],
                 **conditioning: torch.Tensor) -> torch.Tensor:  # fmt: skip
        t = float(timestep.max())  # per-token timesteps (TI2V) hold 0 on the given frame
        name = self.expert_for(t)
        if name != self.active:
            if self.on_switch is not None:
                self.on_switch(name)
            logger.debug("sampling with the %s-noise expert from t=%.1f", name, t)
            self.active = name
        self.history.append((name, t))
        return (self.high if name == "high" else self.low)(latents, timestep, context, **conditioning)
