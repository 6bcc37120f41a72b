"""REPA's frozen image encoder: a transformers vision backbone (``Dinov2Model`` or any ``AutoModel`` ViT) from a
local folder or a hub id already in the Hugging Face cache, and the per-item features ``cache-latents`` stores.

Features of an item: every pixel frame resized (aspect kept) so that its area is about ``image_size`` squared,
each side a multiple of the encoder's patch size, normalised with the encoder's mean / std
(``preprocessor_config.json``, else ImageNet's), through the encoder; the patch tokens of ``last_hidden_state``
(the class and register tokens dropped) on their grid [gh, gw, D]. Each latent frame gets the mean of the frames it
encodes (the first frame alone, then groups of 4, the Wan VAE's temporal stride): [F_latent, gh, gw, D], stored as
float16.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEMPORAL_STRIDE = 4
"""Pixel frames per latent frame after the first (the Wan 2.1 and 2.2 VAEs)."""
FRAME_CHUNK = 16


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().exists()


def load_encoder_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The frozen vision backbone ``repa_encoder_name`` names, in eval mode on ``device``; a ``UserError`` naming
    the key when it is neither a readable folder nor a hub id in the local cache (offline)."""
    from transformers import AutoModel

    path = Path(name).expanduser()
    if _looks_like_path(name) and not path.is_dir():
        raise UserError(f"`repa_encoder_name` = {name!r}: no such folder; give a folder holding the encoder's "
                        "config.json and weights (e.g. a download of facebook/dinov2-base), or a hub id")
    source = str(path) if path.is_dir() else name
    try:
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        where = "the folder" if path.is_dir() else "the hub id (not in the local Hugging Face cache, and offline)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"`repa_encoder_name` = {name!r}: cannot load {where}: {first}. Download it once "
                        f"(`huggingface-cli download {name}`) or set repa_encoder_name to a local folder with its "
                        "config.json and weights") from None
    model = getattr(model, "vision_model", model)  # CLIP / SigLIP style: the vision tower
    return model.eval().requires_grad_(False).to(device, dtype)


def patch_size(model: torch.nn.Module) -> int:
    size = getattr(model.config, "patch_size", None)
    if size is None:
        raise UserError(f"`repa_encoder_name`: {type(model).__name__} has no patch_size in its config; REPA needs a "
                        "ViT-style encoder (DINOv2, ViT, CLIP / SigLIP vision)")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = Path(name).expanduser() / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return tuple(data.get("image_mean", IMAGENET_MEAN)), tuple(data.get("image_std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def encoder_input_size(height: int, width: int, image_size: int, patch: int) -> tuple[int, int]:
    """(h, w): the frame's aspect, area about ``image_size`` squared, each side a multiple of ``patch``."""
    scale = image_size / math.sqrt(height * width)
    return (max(1, round(height * scale / patch)) * patch, max(1, round(width * scale / patch)) * patch)


def latent_frame_groups(frames: int) -> list[range]:
    """The pixel frames each latent frame encodes: [0], [1..4], [5..8], ..."""
    return [range(0, 1)] + [range(1 + TEMPORAL_STRIDE * i, 1 + TEMPORAL_STRIDE * (i + 1))
                            for i in range((frames - 1) // TEMPORAL_STRIDE)]


class FrameEncoder:
    """``encode(pixels [B, 3, F, H, W] in [-1, 1]) -> [B, F_latent, gh, gw, D]`` float16 features."""

    def __init__(self, name: str, image_size: int, device: torch.device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = load_encoder_model(name, device, dtype)
        self.patch = patch_size(self.model)
        self.image_size = image_size
        self.device, self.dtype = device, dtype
        mean, std = _normalisation(name)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        params = inspect.signature(self.model.forward).parameters
        self.extra = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}

    @torch.no_grad()
    def frames(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] in [-1, 1] -> patch features [N, gh, gw, D] (float32)."""
        gh_px, gw_px = encoder_input_size(images.shape[-2], images.shape[-1], self.image_size, self.patch)
        x = images.to(self.device, torch.float32).add(1.0).mul(0.5).clamp(0.0, 1.0)
        x = F.interpolate(x, size=(gh_px, gw_px), mode="bicubic", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.dtype)
        out = self.model(pixel_values=x, **self.extra).last_hidden_state
        gh, gw = gh_px // self.patch, gw_px // self.patch
        if out.ndim == 4:  # a convolutional backbone: [N, D, gh, gw]
            return out.permute(0, 2, 3, 1).float()
        return out[:, -gh * gw:].reshape(out.shape[0], gh, gw, -1).float()  # class / register tokens come first

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, frames = pixels.shape[:3]
        flat = pixels.permute(0, 2, 1, 3, 4).reshape(batch * frames, *pixels.shape[1:2], *pixels.shape[3:])
        features = torch.cat([self.frames(flat[i:i + FRAME_CHUNK]) for i in range(0, flat.shape[0], FRAME_CHUNK)])
        features = features.reshape(batch, frames, *features.shape[1:])  # [B, F, gh, gw, D]
        groups = [features[:, list(g)].mean(dim=1) for g in latent_frame_groups(frames)]
        return torch.stack(groups, dim=1).to(torch.float16).cpu()


def encoder_signature(name: str, image_size: int) -> dict[str, str]:
    """What a feature file records of the encoder: another value makes it stale."""
    return {"repa_encoder": str(name), "repa_image_size": str(int(image_size)), "repa_format": "1"}


def load_frame_encoder(name: str, image_size: int) -> Any:
    """``PixelCache.load`` for the encoder (a picklable callable of the device)."""
    return _Loader(name, image_size)


class _Loader:
    def __init__(self, name: str, image_size: int):
        self.name, self.image_size = name, image_size

    def __call__(self, device: torch.device) -> FrameEncoder:
        return FrameEncoder(self.name, self.image_size, torch.device(device))
