"""Self-correction: train on states the current model's sampler actually visits, not only on the ideal path.

Two variants (``self_correction_variant``): "rollout" (below) and "generated": every ``self_correction_every``-th
step the current model samples short clips of the batch's prompts and shape (``generate_latents``) into
``{output_dir}/self_correction_cache`` (``self_correction_cache_size`` clips, the oldest removed), which replace
the first items of later batches of the same shape as clean latents with their prompts (docs/enhancements.md).

On every ``self_correction_every``-th optimiser step, for the first ``ceil(self_correction_batch_ratio * B)`` items
of each micro-batch whose t is at least ``self_correction_min_t`` (the loader shuffles the batches): starting from
the data noised at t, x_t = (1 - t) x0 + t n, the current model (the trained network on, no gradient) takes
``self_correction_rollout_steps`` Euler steps of the flow ODE to t' = (1 - self_correction_rollout_span) t (not
below the boundary while the Wan 2.2 high-noise expert trains), through the project's one denoising loop
(``sampling.generate.denoise``). The item is then trained at (x~_t', t') against

    target = n~ - x0,   n~ = (x~_t' - (1 - t') x0) / t'     (equivalently (x~_t' - x0) / t')

the flow-matching velocity of the straight path from x0 through the visited state: following it from x~_t' leads
back to the same clean latents x0, and on the ideal path (x~_t' = x_t') it is the usual target n - x0. This is the
target of DREAM (Zhou et al., "DREAM: Diffusion Rectification and Estimation-Adaptive Models", CVPR 2024: the
noise re-estimated from the model's own shifted input, the clean sample kept) with a multi-step sampler rollout
in place of its one-step estimate. The drift, the RMS of x~_t' - x_t' against the data noised at t' with the
same noise, is logged as ``self_correction/drift``. The rollout draws no random numbers: which items roll out and
how far are functions of the step and the batch, so resume is exact, and steps without a rollout train exactly
as without the feature. Frames the objective keeps clean (TI2V-5B image-to-video) stay as they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ...core.state import seeded_generator
from ...errors import UserError
from ...sampling.generate import GenerationSettings, denoise, flow_euler_steps, generate_latents
from ...utils.atomic import save_safetensors_atomic
from ..base import BaseEnhancement, PromptSet, RunContext, StepContext, load_prompt_set
from ..registry import register
from .config import SelfCorrectionConfig

GENERATED_FLOW_SHIFT = 5.0
NEGATIVE = PromptSet("_wtself_correction_prompts.safetensors", {"negative": ""})
CACHE_FOLDER = "self_correction_cache"


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@register("self_correction")
class SelfCorrectionHelper(BaseEnhancement):
    """``self_correction_enabled``: see the module docstring."""

    def __init__(self, cfg: SelfCorrectionConfig, seed: int = 0, output_dir: Path | None = None,
                 run_cfg: Any = None):
        self.cfg = cfg
        self.run_cfg = run_cfg
        self.boundary: float | None = None
        self._drifts: list[float] = []
        self._items = 0
        self.last = {"drift": 0.0, "items": 0.0}
        self.generated = cfg.self_correction_variant == "generated"
        # variant "generated": its own seeded stream (the clips' seeds, which cached clips are mixed in)
        self.gen = seeded_generator(seed + 15)
        self.cache_dir = Path(output_dir or ".") / CACHE_FOLDER
        self.entries: list[str] = []  # cache file names, oldest first
        self.counter = 0  # clips generated so far
        self._done_step = -1
        self._generated = self._mixed = 0
        self.negative: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> SelfCorrectionHelper | None:
        section: SelfCorrectionConfig = cfg.self_correction
        if not section.self_correction_enabled:
            return None
        return cls(section, cfg.training.seed, Path(cfg.saving.output_dir), cfg)

    def text_cache_prompts(self) -> list[PromptSet]:
        return [NEGATIVE] if self.generated and self.cfg.self_correction_guidance_scale != 1.0 else []

    def setup_hooks(self, run: RunContext) -> None:
        self.boundary = getattr(run.experts, "boundary", None)
        if not self.generated:
            return
        if getattr(run.experts, "is_dual", False):
            raise UserError("self_correction_variant = \"generated\" needs a model with one DiT (the clips are "
                            "sampled with the expert a step trains); use the \"rollout\" variant with Wan 2.2 A14B")
        if run.accelerator is not None and run.accelerator.num_processes > 1:
            raise UserError("self_correction_variant = \"generated\" runs on one process (its clip cache in the "
                            f"output folder is not shared between the {run.accelerator.num_processes} processes); "
                            "train on one process, or use the \"rollout\" variant, which works with several")
        if self.cfg.self_correction_guidance_scale != 1.0:
            self.negative = load_prompt_set(self.run_cfg, NEGATIVE)["negative"]

    def rolls_out(self, step: int) -> bool:
        """Whether the optimiser step after ``step`` steps (``ctx.step``) rolls out."""
        return (step + 1) % self.cfg.self_correction_every == 0

    def chosen(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of the items rolled out: the first ceil(ratio * B) of those with t >= min_t."""
        want = max(1, math.ceil(self.cfg.self_correction_batch_ratio * t.shape[0]))
        eligible = torch.nonzero(t >= self.cfg.self_correction_min_t).flatten()
        return eligible[:want]

    def end_t(self, t: torch.Tensor, expert: str) -> torch.Tensor:
        end = (1.0 - self.cfg.self_correction_rollout_span) * t
        if expert == "high_noise" and self.boundary is not None:
            end = torch.maximum(end, torch.full_like(end, self.boundary))  # stay in the high-noise expert's range
        return end

    @torch.no_grad()
    def rollout(self, ctx: StepContext, idx: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """x~_t' of items ``idx``: the sampler's Euler steps from their x_t (in ``ctx.noisy``) to ``t_end``."""
        t_start = ctx.t[idx]
        n = self.cfg.self_correction_rollout_steps
        sigmas = torch.stack([t_start + (t_end - t_start) * (j / n) for j in range(n + 1)])  # [n + 1, k]
        per_token = ctx.timesteps.ndim == 2
        token_on = (ctx.timesteps[idx] > 0).float() if per_token else None  # 0 on a given clean first frame

        def timestep_for(sigma: torch.Tensor) -> torch.Tensor:
            return sigma[:, None] * 1000.0 * token_on if per_token else sigma * 1000.0

        conditioning = ctx.batch.get("conditioning")
        sub_cond = {k: v[idx] for k, v in conditioning.items()} if conditioning else None
        text = [ctx.batch["text_embeds"][int(i)] for i in idx]

        def model_fn(x: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
            return ctx.predict(x, timesteps=timestep, text_embeds=context, conditioning=sub_cond)

        start = ctx.noisy[idx]
        keep = None
        mask = ctx.get("loss_mask")
        if mask is not None:
            keep = mask[idx].to(start).expand_as(start)
        rolled = denoise(model_fn, start, flow_euler_steps(sigmas, timestep_for), text, keep=keep, fixed=start)
        return rolled if keep is None else (1 - keep) * start + keep * rolled

    def modify_noised(self, ctx: StepContext) -> None:
        if self.generated:
            self.generate_and_mix(ctx)
            return
        if not self.rolls_out(ctx.step):
            return
        idx = self.chosen(ctx.t)
        if idx.numel() == 0:
            return
        t_start = ctx.t[idx].clone()
        t_end = self.end_t(t_start, ctx.expert)
        rolled = self.rollout(ctx, idx, t_end)
        x0, noise = ctx.latents[idx], ctx.noise[idx]
        view = (-1, 1, 1, 1, 1)
        ideal = (1 - t_end.view(view)) * x0 + t_end.view(view) * noise  # the data noised at t', same noise
        new_noise = (rolled - (1 - t_end.view(view)) * x0) / t_end.view(view)
        ctx.noisy, ctx.noise, ctx.target = ctx.noisy.clone(), ctx.noise.clone(), ctx.target.clone()
        ctx.t, ctx.timesteps = ctx.t.clone(), ctx.timesteps.clone()
        ctx.noisy[idx] = rolled.to(ctx.noisy.dtype)
        ctx.noise[idx] = new_noise.to(ctx.noise.dtype)
        ctx.target[idx] = (new_noise - x0).to(ctx.target.dtype)
        ctx.t[idx] = t_end
        if ctx.timesteps.ndim == 2:
            ctx.timesteps[idx] = (ctx.timesteps[idx] > 0).float() * (1000.0 * t_end[:, None])
        else:
            ctx.timesteps[idx] = 1000.0 * t_end
        ctx.extras["self_correction"] = {"index": idx, "t_start": t_start, "ideal": ideal}
        self._drifts.append(_rms(rolled - ideal))
        self._items += int(idx.numel())

    # variant "generated" ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, ctx: StepContext) -> None:
        """Clips of the first ceil(ratio * B) prompts of the batch at its bucket shape, sampled by the current model
        from seeds of this helper's stream, written to the cache (the oldest beyond the cache size removed)."""
        latents = ctx.latents
        _, channels, frames, height, width = latents.shape
        if frames > self.cfg.self_correction_clip_len:
            return
        want = max(1, math.ceil(self.cfg.self_correction_batch_ratio * latents.shape[0]))
        scale = self.cfg.self_correction_guidance_scale

        def model_fn(x: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
            return ctx.predict(x, timesteps=timestep, text_embeds=context)

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for i in range(min(want, latents.shape[0])):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))
            settings = GenerationSettings(width=width * 8, height=height * 8, frames=(frames - 1) * 4 + 1, seed=seed,
                                          steps=self.cfg.self_correction_sample_steps, cfg_scale=scale,
                                          flow_shift=GENERATED_FLOW_SHIFT, solver="euler")
            text = ctx.batch["text_embeds"][i]
            clip = generate_latents(model_fn, text, self.negative, settings, latents.device, channels=channels)
            name = f"clip_{self.counter:06d}.safetensors"
            save_safetensors_atomic({"latents": clip[0].to(latents.dtype).cpu(), "text_embeds": text.cpu()},
                                    self.cache_dir / name, metadata={"step": str(ctx.step + 1), "seed": str(seed)})
            self.entries.append(name)
            self.counter += 1
            self._generated += 1
            while len(self.entries) > self.cfg.self_correction_cache_size:
                (self.cache_dir / self.entries.pop(0)).unlink(missing_ok=True)

    def mix(self, ctx: StepContext) -> None:
        """Replace the first ceil(ratio * B) items by cached clips of the batch's shape (drawn from this helper's
        stream): their clean latents and prompts, noised with the item's noise and t."""
        shape = tuple(ctx.latents.shape[1:])
        fits = []
        for name in self.entries:
            entry = load_file(str(self.cache_dir / name))
            if tuple(entry["latents"].shape) == shape:
                fits.append(entry)
        if not fits:
            return
        want = max(1, math.ceil(self.cfg.self_correction_batch_ratio * ctx.latents.shape[0]))
        order = torch.randperm(len(fits), generator=self.gen)[:want].tolist()
        latents, texts = ctx.latents.clone(), list(ctx.batch["text_embeds"])
        for i, j in enumerate(order):
            latents[i] = fits[j]["latents"].to(latents)
            texts[i] = fits[j]["text_embeds"].to(texts[i])
        view = (-1, 1, 1, 1, 1)
        t = ctx.t.view(view)
        ctx.latents = latents
        ctx.batch["latents"] = latents
        ctx.batch["text_embeds"] = texts
        ctx.noisy = ((1 - t) * latents + t * ctx.noise).to(ctx.noisy.dtype)
        ctx.target = (ctx.noise - latents).to(ctx.target.dtype)
        ctx.extras["self_correction"] = {"index": torch.arange(len(order)), "mixed": [fits[j] for j in order]}
        self._mixed += len(order)

    def generate_and_mix(self, ctx: StepContext) -> None:
        if ctx.batch.get("conditioning") is not None or ctx.timesteps.ndim == 2:
            raise UserError("self_correction_variant = \"generated\" supports text-to-video training only (this "
                            "batch has image conditioning or a clean first frame); use the \"rollout\" variant")
        extras = sorted(k for k, v in (ctx.batch.get("item_extras") or {}).items()
                        if v is not None and not (isinstance(v, list) and all(x is None for x in v)))
        if extras:
            raise UserError(f"self_correction_variant = \"generated\" cannot mix its clips into batches with per-item "
                            f"caches ({', '.join(extras)}: masks, REPA features, DOP prompts belong to the data "
                            "items, not to the clips); turn those features off or use the \"rollout\" variant")
        if self.rolls_out(ctx.step) and self._done_step != ctx.step:  # once per step, on its first micro-batch
            self._done_step = ctx.step
            self.generate(ctx)
        self.mix(ctx)

    def state_dict(self) -> dict[str, Any]:
        if not self.generated:
            return {}
        return {"gen": self.gen.get_state(), "counter": self.counter, "done_step": self._done_step,
                "entries": [(name, load_file(str(self.cache_dir / name))) for name in self.entries]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not self.generated or not sd:
            return
        self.gen.set_state(sd["gen"])
        self.counter, self._done_step = int(sd["counter"]), int(sd["done_step"])
        # the cache as it was at the save (a later run may have replaced entries, or the folder is new)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for old in self.cache_dir.glob("clip_*.safetensors"):
            old.unlink()
        self.entries = []
        for name, tensors in sd["entries"]:
            save_safetensors_atomic(tensors, self.cache_dir / name)
            self.entries.append(name)

    def get_self_correction_metrics(self) -> dict[str, float]:
        if self.generated:
            out = {"generated": float(self._generated), "mixed": float(self._mixed), "cache": float(len(self.entries))}
            self._generated = self._mixed = 0
            return out
        if self._drifts:
            self.last = {"drift": sum(self._drifts) / len(self._drifts), "items": float(self._items)}
        else:
            self.last = {"drift": self.last["drift"], "items": 0.0}
        self._drifts, self._items = [], 0
        return dict(self.last)
