"""Image conditioning of the I2V / FLF2V models, as the Wan reference builds it (``wan/image2video.py``,
``wan/first_last_frame2video.py``) and musubi-tuner caches it.

- ``y`` = [mask (4 channels), image latents (16 channels)] along the channels, concatenated to the noisy latents
  by the model. The image latents are the VAE encoding of the window with every frame but the first (FLF2V: but
  the first and the last) set to zero (black). The mask is 1 on the conditioning frames: per pixel frame, with
  the first frame repeated 4 times so that the 4k+1 frames fold into 4 channels per latent frame.
- Wan 2.1 I2V / FLF2V also take the CLIP features of the conditioning frame(s): [257, 1280] per item (FLF2V:
  [2, 257, 1280], first then last).

Which inputs a model type takes is ``CONDITIONING[model_type]``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UserError

CONDITIONING: dict[str, tuple[str, ...]] = {
    "t2v": (),
    "ti2v": (),
    "i2v_a14b": ("image",),
    "i2v": ("image", "clip"),
    "flf2v": ("image", "clip"),
}
"""Per model type: the cached conditioning it trains on ("image": mask + image latents, "clip": CLIP features)."""

_SAME_IMAGE_CONDITION = {"i2v": "first", "i2v_a14b": "first", "flf2v": "first_last"}


def uses_last_frame(model_type: str) -> bool:
    return model_type == "flf2v"


def cache_compatible(cache_type: str, run_type: str) -> bool:
    """Whether latents cached for ``cache_type`` carry what a ``run_type`` run needs (same conditioning frames;
    CLIP features when the run takes them). Every cache serves a run that takes no conditioning."""
    needs = CONDITIONING[run_type]
    if not needs:
        return True
    if _SAME_IMAGE_CONDITION.get(cache_type) != _SAME_IMAGE_CONDITION[run_type]:
        return False
    return set(needs) <= set(CONDITIONING[cache_type])


def condition_pixels(pixels: torch.Tensor, last_frame: bool) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> the same with every frame zero but the first (and the last)."""
    out = torch.zeros_like(pixels)
    out[:, :, :1] = pixels[:, :, :1]
    if last_frame and pixels.shape[2] > 1:
        out[:, :, -1:] = pixels[:, :, -1:]
    return out


def condition_mask(pixel_frames: int, height: int, width: int, last_frame: bool) -> torch.Tensor:
    """The reference's mask for ``pixel_frames`` = 4k+1 frames: [4, k+1, height, width] (latent grid), float32."""
    mask = torch.zeros(1, pixel_frames, height, width)
    mask[:, 0] = 1
    if last_frame:
        mask[:, -1] = 1
    mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)  # [1, F + 3, h, w]
    return mask.view(1, mask.shape[1] // 4, 4, height, width).transpose(1, 2)[0]  # [4, f, h, w]


def dit_model_type(path: str | Path) -> str:
    """The model type of a DiT checkpoint, from its safetensors headers only."""
    from .loading import checkpoint_files, infer_wan_config, read_tensor_index

    entries = read_tensor_index(checkpoint_files(path))
    return infer_wan_config({k: v.shape for k, v in entries.items()}, str(path)).model_type


def run_model_type(model_cfg) -> str:
    """The model type a config trains / samples (read from `dit`, else `dit_high_noise`; "t2v" when neither is set)."""
    for path in (model_cfg.dit, model_cfg.dit_high_noise):
        if path is not None and Path(path).exists():
            try:
                return dit_model_type(path)
            except UserError:
                raise
            except Exception as exc:  # not a readable checkpoint: a user error naming the file, no traceback
                raise UserError(f"`dit`: {path} is not a readable DiT checkpoint ({str(exc).splitlines()[0]})") from None
    return "t2v"


def require_clip_path(model_cfg, model_type: str) -> Path | None:
    """The CLIP vision file of a Wan 2.1 I2V / FLF2V run (a ``UserError`` when unset); None for other models."""
    if "clip" not in CONDITIONING[model_type]:
        return None
    from .clip_vision import CLIP_HELP

    if model_cfg.clip is None:
        raise UserError(f"`clip` is not set: the {model_type} model takes CLIP image features; {CLIP_HELP}")
    if not Path(model_cfg.clip).exists():
        raise UserError(f"`clip`: CLIP vision encoder not found: {model_cfg.clip}; {CLIP_HELP}")
    return Path(model_cfg.clip)
