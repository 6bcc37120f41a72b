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

Image-to-video caches (musubi's ``save_latent_cache_wan`` with ``--i2v`` / ``--clip``) also hold
``latents_image_{F}x{H}x{W}_{dtype}`` [20, F, H, W] (4 mask channels + 16 latent channels of the conditioning
video, see ``models.wan.conditioning``) and, for Wan 2.1 I2V / FLF2V, ``clip_{dtype}`` [257, 1280] (FLF2V
[2, 257, 1280]). Ours add the metadata ``model_type`` (``t2v``, ``i2v``, ``flf2v``, ``i2v_a14b``, ``ti2v``); a
musubi cache without it is typed by its tensors (``cache_model_type``).

TI2V-5B caches hold the Wan 2.2 VAE's latents: [48, F, H/16, W/16] under the same names and keys, nothing else
(the image-to-video conditioning is the clean first latent frame, which the causal VAE encodes alone, so the
video latents already hold it). Every cache records the VAE that made it (metadata ``vae_type``: ``wan2.1`` /
``wan2.2``; without it the channel count tells, ``cache_vae_type``); a cache of the other VAE is a user error
naming the command that re-encodes it. musubi-tuner (checked at 30c658c) does not train the TI2V-5B and has no
Wan 2.2 VAE, so these caches follow its naming and layout but are ours alone.

Loss masks (ours only; musubi-tuner has no mask cache): ``{key}_{W:04d}x{H:04d}_wan_wtmask.safetensors`` beside the
item's latent cache (the latent name with ``_wan`` -> ``_wan_wtmask``), holding ``mask_{F}x{H}x{W}_float16`` of shape
[F, H, W] (the latent frames and cells, values in [0, 1], see ``dataset.masks``) and metadata ``architecture``,
``width``, ``height``, ``format_version``, ``mask_source`` (the mask file's name), ``mask_sha256`` (of its bytes, to
find an edited mask) and, when the item trains unmasked by the ``mask_missing`` rule, ``mask_unmasked`` (why). The
name cannot collide with musubi-tuner's: its caches end in ``_{architecture}.safetensors`` or
``_{architecture}_te.safetensors`` with a fixed list of architecture codes (none starts with ``wt``), and none of its globs
(``*_wan.safetensors``, ``*_wan_te.safetensors``) matches ``*_wan_wtmask.safetensors``; nor with ours (``LATENT_NAME``
and the text name need the ``_wan.safetensors`` / ``_wan_te.safetensors`` ending).

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

MASK_STEM_SUFFIX = "_wtmask"
"""What a mask cache adds to the latent cache's stem (an ``enhancements.base.ItemCache`` suffix)."""
MASK_SUFFIX = f"_{ARCHITECTURE}{MASK_STEM_SUFFIX}.safetensors"
MASK_PREFIX = "mask_"
LATENT_NAME = re.compile(
    r"^(?P<key>(?P<stem>.+?)(?:_\d{5}-\d{3})?)_(?P<width>\d{4,})x(?P<height>\d{4,})" + re.escape(LATENT_SUFFIX) + "$"
)
"""A latent cache file name: ``key`` is the item key (stem plus video window), ``stem`` the media stem."""
MASK_NAME = re.compile(
    r"^(?P<key>(?P<stem>.+?)(?:_\d{5}-\d{3})?)_(?P<width>\d{4,})x(?P<height>\d{4,})" + re.escape(MASK_SUFFIX) + "$"
)
"""A mask cache file name (groups as in ``LATENT_NAME``)."""
_MASK_KEY = re.compile(r"^mask_(\d+)x(\d+)x(\d+)_[a-z0-9_]+$")
_LATENT_KEY = re.compile(r"^latents_(\d+)x(\d+)x(\d+)_[a-z0-9_]+$")
_IMAGE_KEY = re.compile(r"^latents_image_(\d+)x(\d+)x(\d+)_[a-z0-9_]+$")
CLIP_PREFIX = "clip_"



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


def latent_shape(width: int, height: int, frames: int | None = None, stride: int = VAE_STRIDE[1]
                 ) -> tuple[int, int, int]:  # fmt: skip
    """(F, H, W) of the latents of ``frames`` frames (None: an image) at ``width`` x ``height`` pixels, for a VAE
    of spatial ``stride`` (8: Wan 2.1 VAE, 16: Wan 2.2 VAE)."""
    count = 1 if frames is None else (frames - 1) // VAE_STRIDE[0] + 1
    return count, height // stride, width // stride


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
    path: str | Path, latents: torch.Tensor, width: int, height: int, frame_count: int | None = None,
    image_latents: torch.Tensor | None = None, clip: torch.Tensor | None = None, model_type: str | None = None,
    vae_type: str | None = None,
) -> None:
    """Write one item's latents [C, F, H, W] atomically; I2V caches add ``image_latents`` [20, F, H, W] (mask +
    conditioning latents), Wan 2.1 I2V / FLF2V also ``clip`` [257, D] / [2, 257, D]; ``model_type`` and
    ``vae_type`` ("wan2.1" / "wan2.2") are recorded."""
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
    if model_type is not None:
        metadata["model_type"] = model_type
    if vae_type is not None:
        metadata["vae_type"] = vae_type
    tensors = {latent_tensor_key(latents): latents.cpu()}
    suffix = latent_tensor_key(latents).removeprefix("latents_")  # {F}x{H}x{W}_{dtype}
    if image_latents is not None:
        if image_latents.shape[1:] != latents.shape[1:]:
            raise ValueError(f"image latents {tuple(image_latents.shape)} do not match latents {tuple(latents.shape)}")
        tensors[f"latents_image_{suffix}"] = image_latents.to(latents.dtype).cpu()
    if clip is not None:  # named by the latents' dtype, as musubi-tuner does
        tensors[f"{CLIP_PREFIX}{dtype_name(latents.dtype)}"] = clip.to(latents.dtype).cpu()
    save_safetensors_atomic(tensors, path, metadata=metadata)


def cache_vae_type(path: str | Path) -> str:
    """Which VAE made a latent cache: its ``vae_type`` metadata, else the channel count of its latents (16: "wan2.1",
    48: "wan2.2"; musubi-tuner caches, which are all Wan 2.1 VAE caches). Reads the header only."""
    from ..models.wan.latent_space import BY_CHANNELS

    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get("vae_type")
        if recorded:
            return recorded
        key = _single_key(path, [k for k in f.keys() if _LATENT_KEY.match(k)], "latents_FxHxW_dtype")
        channels = f.get_slice(key).get_shape()[0]
    space = BY_CHANNELS.get(channels)
    if space is None:
        raise ValueError(f"{Path(path).name}: latents of {channels} channels, from neither Wan VAE (16 or 48)")
    return space.vae_type


def cache_model_type(path: str | Path) -> str:
    """The model type a latent cache serves: its ``model_type`` metadata, else what its tensors say (musubi
    caches): CLIP features of two frames -> "flf2v", of one -> "i2v", image latents only -> "i2v_a14b", 48-channel
    latents -> "ti2v", else "t2v". Reads the header only."""
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get("model_type")
        if recorded:
            return recorded
        keys = list(f.keys())
        latents = [k for k in keys if _LATENT_KEY.match(k)]
        if latents and f.get_slice(latents[0]).get_shape()[0] == 48:
            return "ti2v"
        clip = [k for k in keys if k.startswith(CLIP_PREFIX)]
        has_image = any(_IMAGE_KEY.match(k) for k in keys)
        if has_image and clip:
            shape = f.get_slice(clip[0]).get_shape()
            return "flf2v" if len(shape) == 3 and shape[0] == 2 else "i2v"
        return "i2v_a14b" if has_image else "t2v"


def load_conditioning(path: str | Path, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The cached conditioning of one item: ``{"image": [20, F, H, W], "clip": [tokens, D] or [frames, tokens, D]}``
    for the requested ``kinds``."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if "image" in kinds:
            out["image"] = f.get_tensor(_single_key(path, [k for k in keys if _IMAGE_KEY.match(k)], "latents_image"))
        if "clip" in kinds:
            out["clip"] = f.get_tensor(_single_key(path, [k for k in keys if k.startswith(CLIP_PREFIX)], "clip"))
    return out


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


def mask_cache_name(stem: str, width: int, height: int, start: int | None = None, frames: int | None = None) -> str:
    """File name of an item's mask cache: its latent cache name with ``_wan_wtmask`` for ``_wan``."""
    return latent_cache_name(stem, width, height, start, frames).removesuffix(LATENT_SUFFIX) + MASK_SUFFIX


def save_mask_cache(path: str | Path, mask: torch.Tensor, width: int, height: int, source: str, sha256: str,
                    unmasked: str | None = None) -> None:
    """Write one item's latent-resolution mask [F, H, W] (float16, atomically); ``unmasked``: why the item trains
    without its mask (then ``mask`` is all ones)."""
    if mask.ndim != 3:
        raise ValueError(f"a mask cache holds [F, H, W], got {tuple(mask.shape)}")
    f, h, w = mask.shape
    metadata = {"architecture": ARCHITECTURE, "width": str(width), "height": str(height),
                "format_version": FORMAT_VERSION, "mask_source": source, "mask_sha256": sha256}
    if unmasked is not None:
        metadata["mask_unmasked"] = unmasked
    tensor = mask.to(torch.float16).cpu().contiguous()
    save_safetensors_atomic({f"{MASK_PREFIX}{f}x{h}x{w}_float16": tensor}, path, metadata=metadata)


def read_mask_header(path: str | Path) -> tuple[tuple[int, int, int], dict[str, str]]:
    """((F, H, W), metadata) of a mask cache from its header; ``ValueError`` / ``OSError`` / ``SafetensorError``."""
    with safe_open(str(path), framework="pt") as f:
        name = _single_key(path, [k for k in f.keys() if _MASK_KEY.match(k)], "mask_FxHxW_dtype")
        metadata = dict(f.metadata() or {})
    match = _MASK_KEY.match(name)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))), metadata


def load_mask_cache(path: str | Path) -> torch.Tensor:
    """The cached mask [F, H, W] as float32."""
    with safe_open(str(path), framework="pt") as f:
        key = _single_key(path, [k for k in f.keys() if _MASK_KEY.match(k)], "mask_FxHxW_dtype")
        return f.get_tensor(key).to(torch.float32)
