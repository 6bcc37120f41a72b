"""Samples during training: the ``[[sample_prompts]]`` generated with the LoRA being trained.

At train start the prompts are encoded once (the text encoder is loaded, used and freed). On a trigger
(``sample_at_first``: before step 0 only, not when a run resumes; ``sample_every_n_steps``,
``sample_every_n_epochs``) the main process denoises every prompt
with the model in eval mode (the LoRA active, Wan 2.2 experts switched at the boundary with their own LoRA),
then loads the VAE for decoding only and frees it again. Files go to ``{output_dir}/sample/`` as
``{output_name}_step{step:08d}_p{index:02d}_s{seed}.mp4`` (png for one frame).

TensorBoard gets one image per prompt under ``sample/p{index:02d}``: the png itself, or for a video its first,
middle and last frame side by side. An enhancement's evaluation variants (``evaluation_variants("sampling")``:
the EMA weights, a slider's strengths) are sampled too, as ``{output_name}-{label}_step…`` and
``sample_{label}/p{index:02d}``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from ...common.logger import get_logger
from ...config.output import SamplingConfig
from ...errors import UserError
from ...models.wan.latent_space import latent_space
from ...sampling.conditioning import encode_sample_conditions
from ...sampling.generate import ExpertSwitch, ModelFn
from ...sampling.pipeline import PromptEmbeds, SampleResult, encode_sample_prompts, render_samples
from ..experts import HIGH_NOISE, LOW_NOISE
from .base import Handler, evaluation_variants
from .inference import inference_session

logger = get_logger(__name__)


def preview_image(frames: np.ndarray) -> np.ndarray:
    """uint8 [H, W', 3]: the single frame, or the first, middle and last frames side by side."""
    if frames.shape[0] == 1:
        return frames[0]
    picks = sorted({0, frames.shape[0] // 2, frames.shape[0] - 1})
    return np.concatenate([frames[i] for i in picks], axis=1)


class SamplingHandler(Handler):
    name = "sampling"

    def __init__(self, cfg: SamplingConfig, model_cfg: Any, out_dir: Path, output_name: str):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.out_dir = Path(out_dir)
        self.output_name = output_name
        self.prompts = list(cfg.sample_prompts)
        self.embeds: list[PromptEmbeds] | None = None
        self.written: list[Path] = []
        self._last_step: int | None = None
        self._warned_single = False
        self.model_type = "t2v"
        self.conditions: list | None = None

    @classmethod
    def from_config(cls, cfg: SamplingConfig, model_cfg: Any, saving_cfg: Any, model_type: str = "t2v"
                    ) -> SamplingHandler | None:  # fmt: skip
        """None without prompts or triggers; a ``UserError`` when a trigger has no prompts to sample."""
        triggered = cfg.sample_at_first or cfg.sample_every_n_steps is not None or cfg.sample_every_n_epochs is not None
        if not cfg.sample_prompts:
            if triggered:
                raise UserError(
                    "sampling is triggered (`sample_at_first` / `sample_every_n_steps` / `sample_every_n_epochs`) "
                    "but there are no [[sample_prompts]]: add at least one table with `text`, or remove the trigger"
                )
            return None
        if not triggered:
            logger.warning("[[sample_prompts]] are set but no trigger: set `sample_every_n_steps`, "
                           "`sample_every_n_epochs` or `sample_at_first` to generate them")
            return None
        from ...sampling.conditioning import check_prompt_images

        check_prompt_images(model_type, cfg.sample_prompts)
        missing = [key for key in ("t5", "t5_tokenizer", "vae") if getattr(model_cfg, key) is None]
        if missing:
            raise UserError(f"sampling needs {', '.join(f'`{k}`' for k in missing)}: set them, or remove the triggers")
        handler = cls(cfg, model_cfg, Path(saving_cfg.output_dir) / "sample", saving_cfg.output_name)
        handler.model_type = model_type
        return handler

    # -- triggers --------------------------------------------------------------------------------

    def on_train_start(self, trainer: Any) -> None:
        if trainer.is_main_process or trainer.engine.sharded:  # a sharded model samples on every process
            self.embeds = encode_sample_prompts(self.model_cfg, self.prompts, trainer.device)
            self.conditions = encode_sample_conditions(self.model_cfg, self.model_type, self.prompts, trainer.device)
        if self.cfg.sample_at_first and trainer.state.step == 0:
            self.sample(trainer)
        elif self.cfg.sample_at_first:
            logger.info("resumed at step %d: sample_at_first applies to a run that starts at step 0 only",
                        trainer.state.step)

    def on_step_end(self, trainer: Any) -> None:
        every = self.cfg.sample_every_n_steps
        if every and trainer.state.step % every == 0:
            self.sample(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        every = self.cfg.sample_every_n_epochs
        if every and trainer.state.epoch % every == 0:
            self.sample(trainer)

    # -- generation ------------------------------------------------------------------------------

    def model_fn(self, trainer: Any) -> ModelFn:
        """The trained model as a ``ModelFn``; with two experts, switched at the boundary (with their LoRA)."""
        experts = trainer.experts
        model = experts.model

        def forward(x, t, ctx, **conditioning):
            return trainer.call_model(model, x, t, ctx, conditioning)

        if not experts.is_dual:
            if self.model_cfg.target_model == "wan22" and self.model_type != "ti2v" and not self._warned_single:
                logger.warning("sampling with the %s expert only: this run loads one Wan 2.2 expert, so it "
                               "serves every denoising step", experts.names[0])
                self._warned_single = True
            return forward
        names = {"high": HIGH_NOISE, "low": LOW_NOISE}
        return ExpertSwitch(
            high=forward,
            low=forward,
            boundary=experts.boundary * 1000.0,
            on_switch=lambda name: experts.activate(names[name]),
        )

    def sample(self, trainer: Any) -> list[SampleResult]:
        step = trainer.state.step
        if self._last_step == step:
            return []  # two triggers on the same step: sample once
        self._last_step = step
        results: list[SampleResult] = []
        main = trainer.is_main_process
        # FSDP: every forward pass of the sharded model needs every process, so all of them denoise the same
        # prompts with the same seeds; the main process decodes and writes.
        if main or trainer.engine.sharded:
            if self.embeds is None:
                self.embeds = encode_sample_prompts(self.model_cfg, self.prompts, trainer.device)
            if self.conditions is None:
                self.conditions = encode_sample_conditions(self.model_cfg, self.model_type, self.prompts,
                                                           trainer.device)
            if main:
                logger.info("step %d: generating %d sample(s)", step, len(self.prompts))
            variants = [("", contextlib.nullcontext)]
            variants += [(f"-{v.label}", v.applied) for v in evaluation_variants(trainer, "sampling")]
            for suffix, applied in variants:  # the trained weights, then each enhancement's (EMA, slider strengths)
                with inference_session(trainer), applied():
                    rendered = render_samples(
                        self.model_fn(trainer), self.prompts, self.embeds, vae_path=self.model_cfg.vae,
                        device=trainer.device, out_dir=self.out_dir, name=f"{self.output_name}{suffix}", step=step,
                        conditions=self.conditions, latent_space=latent_space(self.model_type), write=main,
                    )  # fmt: skip
                for result in rendered:
                    trainer.metrics.log_image(f"sample{suffix.replace('-', '_')}/p{result.prompt_index:02d}",
                                              preview_image(result.frames), step)
                results.extend(rendered)
            self.written.extend(r.path for r in results)
        trainer.wait_for_everyone()
        return results
