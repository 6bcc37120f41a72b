"""The image conditioning ``cache-latents`` writes for the I2V / FLF2V models, beside the video latents.

What is encoded follows the Wan reference (see ``models.wan.conditioning``): the window with all frames but the
conditioning one(s) black, through the same VAE, plus the mask; for Wan 2.1 I2V / FLF2V the CLIP features of the
conditioning frame(s). An image item (one frame) is its own conditioning frame, as in musubi-tuner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..common.logger import get_logger
from ..models.wan.conditioning import CONDITIONING, condition_mask, condition_pixels, uses_last_frame

logger = get_logger(__name__)


@dataclass
class ImageConditioner:
    """Encodes the conditioning of a batch of windows for one model type."""

    model_type: str
    vae: Any
    clip: Any | None = None

    @classmethod
    def load(cls, model_type: str, vae: Any, clip_path, device: torch.device, dtype: torch.dtype
             ) -> ImageConditioner | None:  # fmt: skip
        """None for models without image conditioning; loads the CLIP encoder when the model takes it."""
        needs = CONDITIONING[model_type]
        if not needs:
            return None
        clip = None
        if "clip" in needs:
            from ..models.wan.clip_vision import WanCLIPVision

            clip = WanCLIPVision.load(clip_path, device=device, dtype=dtype)
        logger.info("caching the %s conditioning (%s) beside the latents", model_type, " + ".join(needs))
        return cls(model_type, vae, clip)

    def encode(self, pixels: torch.Tensor, latents: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """pixels [B, 3, F, H, W] and their latents [B, 16, f, h, w] -> per item ``{"image_latents": [20, f, h, w],
        "clip": [tokens, D] or [2, tokens, D]}`` (the CLIP entry only for the models that take it)."""
        last = uses_last_frame(self.model_type)
        frames = pixels.shape[2]
        if frames == 1:  # an image is its own conditioning frame: the same encoding
            image_latents = latents
        else:
            image_latents = self.vae.encode(condition_pixels(pixels, last))
        mask = condition_mask(frames, latents.shape[3], latents.shape[4], last).to(image_latents)
        y = torch.cat([mask.expand(latents.shape[0], -1, -1, -1, -1), image_latents], dim=1)  # [B, 20, f, h, w]
        clip = None
        if self.clip is not None:
            first = self.clip.encode(pixels[:, :, 0])  # [B, tokens, D]
            clip = torch.stack([first, self.clip.encode(pixels[:, :, -1])], dim=1) if last else first
        return [{"image_latents": y[i], **({"clip": clip[i]} if clip is not None else {})}
                for i in range(latents.shape[0])]  # fmt: skip
