"""Cache file names, tensor keys and metadata, compatible with musubi-tuner's Wan caches.

Latents: ``{stem}_{W:04d}x{H:04d}_wan.safetensors`` (images) or
``{stem}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_wan.safetensors`` (video windows), holding
``latents_{F}x{H}x{W}_{dtype}`` of shape [16, F, H, W] (latent dims) and metadata ``architecture=wan``,
``width``, ``height``, ``format_version=1.0.1`` and, for video, ``frame_count``.
Text: ``{stem}_wan_te.safetensors`` holding ``varlen_t5_{dtype}`` of shape [L, D] (L = real token count) and
metadata ``architecture=wan``, ``caption1`` (the caption encoded) and ``format_version=1.0.1``.

Checked against musubi-tuner's ``get_latent_cache_path`` / ``save_latent_cache_wan`` /
``save_text_encoder_output_cache_wan``: same names, keys, dtype strings and metadata keys, so either tool reuses the
other's caches. The W x H of a latent name (and the ``width`` / ``height`` metadata) is musubi's
``original_size``: for an image its own pixel size (as shown, EXIF rotation applied); for a video the size its
frames are read at, which musubi fixes as the bucket of the first frame's size with bucketing on and upscaling
allowed, whatever the dataset's ``enable_bucket`` / ``bucket_no_upscale`` say. A name therefore does not identify
the resolution the latents were encoded at: readers compare the ``latents_{F}x{H}x{W}`` key in the file header
with the shape they expect (``latent_shape``) and treat a mismatch as a stale cache. musubi replaces NaN latents by
zeros with a warning; here NaN caches are not written (the caching commands report them).

musubi keeps the tensors already in a cache file when it writes one, so re-caching in another dtype over a file
leaves two ``latents_{F}x{H}x{W}_*`` (or two ``varlen_t5_*``) tensors in it. Such a file is ambiguous
(``AmbiguousCacheError``): readers treat it like a stale cache, and the caching commands encode it again (our
writes replace the whole file).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..utils.atomic import save_safetensors_atomic

ARCHITECTURE = "wan"
FORMAT_VERSION = "1.0.1"
LATENT_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"
TEXT_PREFIX = "varlen_t5_"
VAE_STRIDE = (4, 8, 8)
"""Frames, height and width of the source per latent cell (the first frame gets a latent frame of its own)."""

LATENT_NAME = re.compile(
    r"^(?P<key>(?P<stem>.+?)(?:_\d{5}-\d{3})?)_(?P<width>\d{4,})x(?P<height>\d{4,})" + re.escape(LATENT_SUFFIX) + "$"
)
"""A latent cache file name: ``key`` is the item key (stem plus video window), ``stem`` the media stem."""
_LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_[a-z0-9_]+$")



class AmbiguousCacheError(ValueError):
    """A cache file holding more than one latents (or text) tensor: which one is current cannot be told."""


def _single_key(path: str | Path, keys: list[str], what: str) -> str:
    if len(keys) > 1:
        raise AmbiguousCacheError(f"{Path(path).name} holds {len(keys)} {what} tensors ({', '.join(sorted(keys))}): "
                                  "re-cached in another dtype over the file; it must be encoded again")
    if not keys:
        raise ValueError(f"{path}: holds no {what} tensor")
    return keys[0]


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def latent_cache_name(stem: str, width: int, height: int, start: int | None = None, frames: int | None = None) -> str:
    """File name of a latent cache; ``start``/``frames`` for a video window."""
    if (start is None) != (frames is None):
        raise ValueError("start and frames go together")
    window = f"_{start:05d}-{frames:03d}" if start is not None else ""
    return f"{stem}{window}_{width:04d}x{height:04d}{LATENT_SUFFIX}"


def latent_shape(width: int, height: int, frames: int | None = None) -> tuple[int, int, int]:
    """(F, H, W) of the latents of ``frames`` frames (None: an image) at ``width`` x ``height`` pixels."""
    count = 1 if frames is None else (frames - 1) // VAE_STRIDE[0] + 1
    return count, height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def read_latent_shape(path: str | Path) -> tuple[int, int, int]:
    """(F, H, W) of the latents in a cache file, parsed from its ``latents_{F}x{H}x{W}_{dtype}`` tensor name.

    Reads only the safetensors header. Raises ``AmbiguousCacheError`` when it holds several, ``ValueError`` when
    it holds no such tensor and ``OSError`` / ``SafetensorError`` when it cannot be read.
    """
    with safe_open(str(path), framework="pt") as f:
        name = _single_key(path, [k for k in f.keys() if _LATENT_KEY.match(k)], "latents_FxHxW_dtype")
    match = _LATENT_KEY.match(name)
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def check_text_cache(path: str | Path) -> None:
    """Raise unless ``path`` holds exactly one ``varlen_t5_*`` tensor (``AmbiguousCacheError`` for several).

    Reads only the safetensors header; ``OSError`` / ``SafetensorError`` when it cannot be read.
    """
    with safe_open(str(path), framework="pt") as f:
        _single_key(path, [k for k in f.keys() if k.startswith(TEXT_PREFIX)], f"{TEXT_PREFIX}*")


def text_cache_name(stem: str) -> str:
    return f"{stem}{TEXT_SUFFIX}"


def latent_tensor_key(latents: torch.Tensor) -> str:
    _, f, h, w = latents.shape
    return f"latents_{f}x{h}x{w}_{dtype_name(latents.dtype)}"


def text_tensor_key(embeds: torch.Tensor) -> str:
    return f"{TEXT_PREFIX}{dtype_name(embeds.dtype)}"


def save_latent_cache(
    path: str | Path, latents: torch.Tensor, width: int, height: int, frame_count: int | None = None
) -> None:
    """Write one item's latents [16, F, H, W] atomically."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be [C, F, H, W], got {tuple(latents.shape)}")
    metadata = {
        "architecture": ARCHITECTURE,
        "width": str(width),
        "height": str(height),
        "format_version": FORMAT_VERSION,
    }
    if frame_count is not None:
        metadata["frame_count"] = str(frame_count)
    save_safetensors_atomic({latent_tensor_key(latents): latents.cpu()}, path, metadata=metadata)


def save_text_cache(path: str | Path, embeds: torch.Tensor, caption: str | None = None) -> None:
    """Write one caption's embeddings [L, D] atomically; ``caption`` goes to the ``caption1`` metadata key."""
    if embeds.ndim != 2:
        raise ValueError(f"text embeddings must be [L, D], got {tuple(embeds.shape)}")
    metadata = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION}
    if caption is not None:
        metadata["caption1"] = caption
    save_safetensors_atomic({text_tensor_key(embeds): embeds.cpu()}, path, metadata=metadata)


def load_latent_cache(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Return (latents [16, F, H, W], metadata): the ``latents_{F}x{H}x{W}_{dtype}`` tensor.

    musubi-tuner's image-to-video / control caches of the same item also hold ``latents_image_...``,
    ``latents_control_...`` and ``clip_...`` tensors; those are not the video latents and are ignored.
    """
    with safe_open(str(path), framework="pt") as f:
        key = _single_key(path, [k for k in f.keys() if _LATENT_KEY.match(k)], "latents_FxHxW_dtype")
        return f.get_tensor(key), dict(f.metadata() or {})


def load_text_cache(path: str | Path) -> torch.Tensor:
    """Return the caption embeddings [L, D] (``AmbiguousCacheError`` when the file holds several)."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(_single_key(path, [k for k in f.keys() if k.startswith(TEXT_PREFIX)], f"{TEXT_PREFIX}*"))
