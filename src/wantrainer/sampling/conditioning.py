"""The image inputs of the I2V / FLF2V samples: ``image`` (and ``last_image``) of each ``[[sample_prompts]]`` table.

Each image is resized to cover the prompt's width x height (Lanczos, EXIF rotation applied) and centre-cropped,
as Wan 2.2's reference crops its input image. The conditioning is then built as for training
(``models.wan.conditioning``): the VAE encoding of the image followed by black frames (FLF2V: and the last image
as the last frame), the mask, and for Wan 2.1 I2V / FLF2V the CLIP features. The VAE and CLIP are loaded once,
used and freed. Each prompt's conditioning comes back on the CPU as ``{"y": ..., "clip_fea": ...}``; a
``ModelFn`` takes it as keyword arguments (``bind``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..common.logger import get_logger
from ..errors import UserError
from ..models.wan.conditioning import CONDITIONING, condition_mask, uses_last_frame
from .generate import ModelFn

logger = get_logger(__name__)


def load_frame(path: Path, width: int, height: int) -> torch.Tensor:
    """An image file -> [3, height, width] in [-1, 1] (cover-resized, centre-cropped)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as handle:
            image = ImageOps.exif_transpose(handle).convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"[[sample_prompts]] image {path}: cannot be read as an image ({exc})") from None
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def check_prompt_images(model_type: str, prompts: Sequence) -> None:
    """Every prompt of an I2V model has its ``image`` (FLF2V: ``last_image`` too); TI2V-5B takes an image or
    none (image-to-video or text-to-video); T2V models take none."""
    needs = CONDITIONING[model_type]
    for index, prompt in enumerate(prompts):
        where = f"[[sample_prompts]] {index} ({prompt.text[:40]!r})"
        optional = model_type == "ti2v" and prompt.image is not None
        if not needs and not optional and (prompt.image is not None or prompt.last_image is not None):
            raise UserError(f"{where} sets `image` / `last_image`, but the DiT is a {model_type} model, which "
                            "takes no image: remove them or use an image-to-video DiT")
        if needs and prompt.image is None:
            raise UserError(f"{where}: the {model_type} model starts from an image: set `image` (or pass --image)")
        if uses_last_frame(model_type) and prompt.last_image is None:
            raise UserError(f"{where}: the FLF2V model needs the last frame too: set `last_image` (or --last-image)")
        if not uses_last_frame(model_type) and prompt.last_image is not None:
            raise UserError(f"{where} sets `last_image`, which only the FLF2V model takes")
        for path in (prompt.image, prompt.last_image):
            if path is not None and not Path(path).is_file():
                raise UserError(f"{where}: image not found: {path}")
        if model_type == "ti2v" and (prompt.width % 32 or prompt.height % 32):
            raise UserError(f"{where}: {prompt.width}x{prompt.height}: the TI2V-5B needs a width and height that are "
                            "multiples of 32 (the Wan 2.2 VAE compresses 16x, the DiT patchifies by 2)")


def condition_from_frames(model_type: str, vae, clip, first: torch.Tensor, last: torch.Tensor | None,
                          frames: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """One sample's conditioning from its frame(s) [3, H, W] in [-1, 1]: ``y`` [1, 20, f, h, w], ``clip_fea``."""
    video = torch.zeros(1, 3, frames, *first.shape[1:])
    video[0, :, 0] = first
    if last is not None and frames > 1:
        video[0, :, -1] = last
    latents = vae.encode(video).float().cpu()  # [1, 16, f, h, w]
    mask = condition_mask(frames, latents.shape[3], latents.shape[4], last is not None)
    out = {"y": torch.cat([mask[None], latents], dim=1)}
    if clip is not None:
        first_features = clip.encode(first[None]).cpu()  # [1, tokens, D]
        out["clip_fea"] = first_features if last is None else torch.stack(
            [first_features[0], clip.encode(last[None]).cpu()[0]])[None]  # [1, 2, tokens, D]
    return out


def encode_sample_conditions(model_cfg, model_type: str, prompts: Sequence, device: torch.device | str
                             ) -> list[dict[str, torch.Tensor] | None]:  # fmt: skip
    """Per prompt: its conditioning on the CPU, or None for a model that takes no image."""
    check_prompt_images(model_type, prompts)
    needs = CONDITIONING[model_type]
    if model_type == "ti2v":
        return _ti2v_first_frames(model_cfg, prompts, device)
    if not needs:
        return [None] * len(prompts)
    from ..models.wan.clip_vision import WanCLIPVision
    from ..models.wan.conditioning import require_clip_path
    from ..models.wan.vae import WanVAE
    from .pipeline import free_memory

    if model_cfg.vae is None:
        raise UserError("`vae` is not set: the VAE encodes the [[sample_prompts]] images")
    device = torch.device(device)
    vae = WanVAE.load(model_cfg.vae, device=device, dtype=torch.float32)
    clip = WanCLIPVision.load(require_clip_path(model_cfg, model_type), device=device) if "clip" in needs else None
    try:
        out = []
        for prompt in prompts:
            first = load_frame(prompt.image, prompt.width, prompt.height)
            last = load_frame(prompt.last_image, prompt.width, prompt.height) if prompt.last_image else None
            with torch.no_grad():
                out.append(condition_from_frames(model_type, vae, clip, first, last, prompt.frames))
        logger.info("encoded the conditioning image(s) of %d sample prompt(s)", len(prompts))
        return out
    finally:
        del vae, clip
        free_memory(device)


def _ti2v_first_frames(model_cfg, prompts: Sequence, device: torch.device | str) -> list[dict | None]:
    """TI2V-5B: the clean Wan 2.2 VAE latents [1, 48, 1, h, w] of each prompt's image (None: text-to-video)."""
    if not any(p.image is not None for p in prompts):
        return [None] * len(prompts)
    from ..models.wan.vae import WanVAE
    from .pipeline import free_memory

    if model_cfg.vae is None:
        raise UserError("`vae` is not set: the Wan 2.2 VAE encodes the [[sample_prompts]] images")
    vae = WanVAE.load(model_cfg.vae, device=device, dtype=torch.float32)
    try:
        if vae.latent_channels != 48:
            raise UserError(f"`vae` = {model_cfg.vae} has {vae.latent_channels} latent channels; the TI2V-5B uses "
                            "the 48-channel Wan 2.2 VAE (wan2.2_vae.safetensors / Wan2.2_VAE.pth)")
        out: list[dict | None] = []
        for prompt in prompts:
            if prompt.image is None:
                out.append(None)
                continue
            frame = load_frame(prompt.image, prompt.width, prompt.height)
            with torch.no_grad():
                out.append({"first_frame": vae.encode(frame[None, :, None]).float().cpu()})
        return out
    finally:
        del vae
        free_memory(device)


def split_first_frame(condition: dict[str, torch.Tensor] | None
                      ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:  # fmt: skip
    """(model inputs, TI2V first-frame latents) of one prompt's conditioning: the first frame is for the loop."""
    if not condition or "first_frame" not in condition:
        return condition, None
    rest = {k: v for k, v in condition.items() if k != "first_frame"}
    return rest or None, condition["first_frame"]


def bind(model_fn: ModelFn, condition: dict[str, torch.Tensor] | None, device: torch.device | str) -> ModelFn:
    """``model_fn`` with one sample's conditioning passed on every call (unchanged when None)."""
    if condition is None:
        return model_fn
    on_device = {k: v.to(device) for k, v in condition.items()}

    def conditioned(latents: torch.Tensor, timestep: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
        return model_fn(latents, timestep, context, **on_device)

    return conditioned
