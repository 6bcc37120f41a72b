"""The pieces shared by ``wantrainer sample`` and sampling during training.

1. ``encode_sample_prompts``: load the text encoder, encode every prompt and negative prompt once, free it.
2. ``dit_model_fn``: our ``ModelFn`` call shape over a ``WanModel`` (device, precision, block swap).
3. ``render_samples``: denoise every prompt, then load the VAE, decode, write mp4 / png files, free the VAE.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.logger import get_logger
from ..errors import UserError
from .generate import GenerationSettings, ModelFn, generate_latents
from .writers import sample_stem, to_uint8_frames, write_sample

logger = get_logger(__name__)


@dataclass
class PromptEmbeds:
    """One prompt's text embeddings on the CPU: ``context`` [L, D]; ``negative`` None when cfg_scale == 1."""

    context: torch.Tensor
    negative: torch.Tensor | None


@dataclass
class SampleResult:
    prompt_index: int
    seed: int
    path: Path
    frames: np.ndarray
    """uint8 [F, H, W, 3], as written."""


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage and, on CUDA, return cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def compute_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """The DiT's compute precision: fp32 on the CPU (a bf16 matmul there is very slow) or with "no"."""
    if torch.device(device).type == "cpu" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def _require(value: object, key: str, why: str) -> None:
    if value is None:
        raise UserError(f"`{key}` is not set: {why}")


GIB = 1 << 30
TEXT_ENCODER_MARGIN = 2 * GIB
"""Free GPU memory kept besides the text encoder's weights (activations, CUDA context)."""


def text_encoder_device(device: torch.device | str, weights_bytes: int, free_bytes: int | None) -> torch.device:
    """Where to run the text encoder: ``device``, or the CPU when a GPU lacks the free memory for it.

    During training the DiT is already on the GPU; UMT5-XXL needs about 11 GiB more, which a card that trains
    with block swap or fp8 may not have. ``free_bytes`` None means "unknown" (keep ``device``).
    """
    device = torch.device(device)
    if device.type != "cuda" or free_bytes is None or free_bytes >= weights_bytes + TEXT_ENCODER_MARGIN:
        return device
    logger.info(
        "%.1f GiB of GPU memory free, the text encoder needs about %.1f GiB: encoding the sample prompts on the CPU",
        free_bytes / GIB, (weights_bytes + TEXT_ENCODER_MARGIN) / GIB,
    )
    return torch.device("cpu")


def _weights_bytes(path: Path) -> int:
    """Size of a weights file (or of the files in a folder); 0 when missing (the loader reports that)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _free_gpu_bytes(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def encode_sample_prompts(model_cfg, prompts: Sequence, device: torch.device | str) -> list[PromptEmbeds]:
    """Encode the ``[[sample_prompts]]`` (and their negative prompts) once; the text encoder is freed after.

    ``model_cfg`` is the model section (``t5``, ``t5_tokenizer``). Embeddings come back float32 on the CPU.
    """
    from ..models.wan.text_encoder import WanTextEncoder

    _require(model_cfg.t5, "t5", "the text encoder is needed to encode [[sample_prompts]]")
    _require(model_cfg.t5_tokenizer, "t5_tokenizer", "the tokenizer is needed to encode [[sample_prompts]]")
    texts: list[str] = []
    for prompt in prompts:
        texts.append(prompt.text)
        if GenerationSettings.from_prompt(prompt).uses_cfg:
            texts.append(prompt.negative_prompt)
    unique = list(dict.fromkeys(texts))
    device = text_encoder_device(device, _weights_bytes(Path(model_cfg.t5)), _free_gpu_bytes(torch.device(device)))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    logger.info("encoding %d sample prompt text(s) with the text encoder on %s", len(unique), device)
    encoder = WanTextEncoder.load(model_cfg.t5, model_cfg.t5_tokenizer, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            encoded = encoder.encode(unique)
        by_text = {text: emb.detach().float().cpu() for text, emb in zip(unique, encoded)}
    finally:
        del encoder
        free_memory(device)
    out = []
    for prompt in prompts:
        negative = by_text[prompt.negative_prompt] if GenerationSettings.from_prompt(prompt).uses_cfg else None
        out.append(PromptEmbeds(context=by_text[prompt.text], negative=negative))
    return out


def dit_model_fn(dit: torch.nn.Module) -> ModelFn:
    """Call a ``WanModel`` with our ``ModelFn`` shape.

    The DiT computes in its own dtype (``dit.dtype``; norms and modulation in float32) on ``dit.device``, so
    no autocast is needed. A model with block swap gets ``prepare_block_swap_before_forward()`` first, so
    the swapped blocks start from their resting place as before a training forward.
    """

    def model_fn(latents: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor],
                 **conditioning: torch.Tensor) -> torch.Tensor:  # fmt: skip
        dit.prepare_block_swap_before_forward()
        device = dit.device
        extra = {k: v.to(device) for k, v in conditioning.items()}
        out = dit(latents.to(device), timestep.to(device), [c.to(device) for c in context], **extra)
        return out.float()

    return model_fn


def generate_all_latents(
    model_fn: ModelFn,
    prompts: Sequence,
    embeds: Sequence[PromptEmbeds],
    device: torch.device | str,
    conditions: Sequence[dict[str, torch.Tensor] | None] | None = None,
    latent_space: tuple[int, int] = (16, 8),
) -> list[torch.Tensor]:
    """Denoise every prompt (with its image conditioning, if any); latents come back on the CPU so the VAE can
    take the device afterwards. ``latent_space``: (channels, spatial stride) of the VAE, (48, 16) for TI2V-5B."""
    from .conditioning import bind, split_first_frame

    out = []
    conditions = conditions if conditions is not None else [None] * len(prompts)
    for index, (prompt, emb, condition) in enumerate(zip(prompts, embeds, conditions)):
        settings = GenerationSettings.from_prompt(prompt)
        logger.info(
            "sample %d/%d: %dx%d, %d frame(s), %d %s step(s), cfg %.2g, seed %d",
            index + 1, len(prompts), settings.width, settings.height, settings.frames, settings.steps,
            settings.solver, settings.cfg_scale, settings.seed,
        )
        condition, first_frame = split_first_frame(condition)
        latents = generate_latents(bind(model_fn, condition, device), emb.context, emb.negative, settings,
                                   device=device, channels=latent_space[0], stride=latent_space[1],
                                   first_frame=first_frame)
        out.append(latents.cpu())
    return out


def decode_and_write(
    latents: Sequence[torch.Tensor],
    prompts: Sequence,
    vae_path: Path | None,
    device: torch.device | str,
    out_dir: Path,
    name: str,
    step: int | None,
) -> list[SampleResult]:
    """Load the VAE, decode each latent video, write it, then free the VAE."""
    from ..models.wan.latent_space import BY_CHANNELS
    from ..models.wan.vae import WanVAE

    _require(vae_path, "vae", "the VAE is needed to decode samples")
    vae = WanVAE.load(vae_path, device=device, dtype=torch.float32)
    results: list[SampleResult] = []
    try:
        for index, (lat, prompt) in enumerate(zip(latents, prompts)):
            if lat.shape[1] != vae.latent_channels:
                raise UserError(f"`vae` = {vae_path} has {vae.latent_channels} latent channels, the DiT {lat.shape[1]}: "
                                "the Wan 2.1 VAE goes with the 16-channel models, the Wan 2.2 VAE with TI2V-5B")
            with torch.no_grad():
                pixels = vae.decode(lat.to(device=device, dtype=torch.float32))
            frames = to_uint8_frames(pixels)
            fps = BY_CHANNELS[vae.latent_channels].fps  # the model's own rate: 24 for the TI2V-5B, else 16
            path = write_sample(out_dir, sample_stem(name, index, prompt.seed, step=step), frames, fps=fps)
            logger.info("wrote %s", path)
            results.append(SampleResult(prompt_index=index, seed=prompt.seed, path=path, frames=frames))
    finally:
        del vae
        free_memory(device)
    return results


def render_samples(
    model_fn: ModelFn,
    prompts: Sequence,
    embeds: Sequence[PromptEmbeds],
    *,
    vae_path: Path | None,
    device: torch.device | str,
    out_dir: Path,
    name: str,
    step: int | None = None,
    before_decode: Callable[[], None] | None = None,
    conditions: Sequence[dict[str, torch.Tensor] | None] | None = None,
    latent_space: Any = None,
    write: bool = True,
) -> list[SampleResult]:
    """Generate and write every prompt. ``before_decode`` runs between denoising and decoding (e.g. to
    move an offloadable DiT out of the way of the VAE); ``latent_space``: the model's
    (``models.wan.latent_space``; default the Wan 2.1 VAE's). ``write = False``: denoise only (the other
    processes of a sharded model, whose every forward pass needs them all), nothing decoded or returned."""
    space = (16, 8) if latent_space is None else (latent_space.channels, latent_space.spatial_stride)
    latents = generate_all_latents(model_fn, prompts, embeds, device, conditions, latent_space=space)
    if not write:
        return []
    if before_decode is not None:
        before_decode()
    return decode_and_write(latents, prompts, vae_path, device, Path(out_dir), name, step)
