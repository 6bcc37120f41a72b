"""Per-item loss masks: finding them, checking them, and mapping them onto the latent grid.

A dataset with ``mask_directory`` has one mask per media file there, with the same stem: an image (png, jpg,
webp, bmp) for an image; for a video a mask video (or frame folder) with the video's frame count, or one image
used for every frame. Masks are grayscale, white = learn, black = ignore (colour files are read as luminance,
alpha is ignored, 16-bit files are scaled), and have the media's own pixel size (an image as shown, EXIF
rotation applied).

Each item's mask goes through exactly what its pixels go through before the VAE: the same frame window (and
``source_fps`` resampling), the same resize to the bucket and the same centre crop (``windows.window_pixels``
and ``buckets.resize_to_bucket``). It is then averaged over the cells of the Wan VAE (``VAE_STRIDE``): 8 x 8
pixels in space and, in time, the first frame alone (latent frame 0), then groups of 4 frames (latent frame
``k >= 1`` covers frames ``4k - 3 .. 4k``), so a latent cell's weight is the fraction of its pixels to learn.

A missing, unreadable or mis-sized mask is a problem of the item with a rule, ``mask_missing``: "skip" leaves
the item out (listed like unreadable media), "unmasked" trains it on the whole frame (listed like a missing
caption; its mask cache holds ones and says why).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MediaError, UserError
from .blueprint import DatasetSpec
from .buckets import resize_to_bucket
from .cache_format import VAE_STRIDE, mask_cache_name, read_mask_header
from .media import (
    frame_folder_files,
    frames_to_tensor,
    is_image_file,
    is_video_file,
    load_image,
    probe_image,
    probe_video,
)
from .sources import MediaItem
from .windows import window_pixels

_LUMA = torch.tensor([0.299, 0.587, 0.114])
"""Pillow's RGB -> L weights."""


def rule_text(rule: str) -> str:
    if rule == "skip":
        return 'mask_missing = "skip": not trained; add or fix the mask, or set mask_missing = "unmasked"'
    return 'mask_missing = "unmasked": trained on the whole frame'


def mask_folder(spec: DatasetSpec) -> Path:
    """The dataset's mask folder; ``UserError`` when it does not exist."""
    folder = spec.mask_directory
    assert folder is not None
    if not Path(folder).is_dir():
        raise UserError(f"`{spec.name}.mask_directory`: folder {folder} does not exist; create it with one mask "
                        "per item (same stem) or remove the key")
    return Path(folder)


def find_mask(folder: Path, stem: str, is_video: bool) -> Path:
    """The mask of the media with ``stem``: ``{stem}.{image ext}``, or for a video also ``{stem}.{video ext}`` or
    a frame folder ``{stem}/``. Raises ``MediaError`` when there is none or more than one."""
    found = [p for p in sorted(folder.glob(f"{_glob_escape(stem)}.*")) if p.stem == stem
             and (is_image_file(p) or (is_video and is_video_file(p)))]
    if is_video and frame_folder_files(folder / stem):
        found.append(folder / stem)
    if not found:
        kinds = "an image, a video or a folder of frames" if is_video else "an image"
        raise MediaError(f"no mask {stem}.* in {folder} ({kinds} with the same stem)")
    if len(found) > 1:
        raise MediaError(f"several masks for {stem} in {folder} ({', '.join(p.name for p in found)}): keep one")
    return found[0]


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def check_mask(mask: Path, size: tuple[int, int], frame_count: int | None, decode: bool = False) -> None:
    """Raise ``MediaError`` unless ``mask`` is readable and of the media's ``size`` (width, height) and, for a
    mask video of a video of ``frame_count`` frames, of that frame count. ``decode`` decodes a mask image fully."""
    is_clip = mask.is_dir() or is_video_file(mask)
    try:
        if is_clip:
            info = probe_video(mask)
            mask_size, mask_frames = (info.width, info.height), info.frame_count
        else:
            mask_size, mask_frames = probe_image(mask, decode=decode), None
    except MediaError as exc:
        raise MediaError(f"unreadable mask {mask.name}: {exc}") from None
    if mask_size != tuple(size):
        raise MediaError(f"mask {mask.name} is {mask_size[0]}x{mask_size[1]}, the media {size[0]}x{size[1]}: a mask "
                         "must have the media's pixel size")
    if mask_frames is not None and mask_frames != frame_count:
        raise MediaError(f"mask video {mask.name} has {mask_frames} frames, the video {frame_count}: use a mask video "
                         "of the same length, or one mask image for every frame")


def mask_sha256(mask: Path) -> str:
    """Hash of the mask's bytes (a frame folder: of its files' names and bytes, in order)."""
    digest = hashlib.sha256()
    for file in frame_folder_files(mask) if mask.is_dir() else [mask]:
        if mask.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def mask_signature(item: MediaItem, hashes: dict[Path, str]) -> tuple[str, str]:
    """(mask file name, SHA-256) the item's mask cache must record ("", "" when it trains unmasked from the scan)."""
    if item.mask_path is None:
        return "", ""
    if item.mask_path not in hashes:
        hashes[item.mask_path] = mask_sha256(item.mask_path)
    return item.mask_path.name, hashes[item.mask_path]


def mask_cache_state(item: MediaItem, hashes: dict[Path, str]) -> str:
    """"missing", "current" (the item's latent shape, made from the same mask file) or "stale"."""
    assert item.mask_cache_path is not None
    if not item.mask_cache_path.is_file():
        return "missing"
    try:
        shape, metadata = read_mask_header(item.mask_cache_path)
    except Exception:  # truncated or foreign file: made again
        return "stale"
    source, sha = mask_signature(item, hashes)
    current = shape == item.latent_shape and (metadata.get("mask_source"), metadata.get("mask_sha256")) == (source, sha)
    return "current" if current else "stale"


def attach_masks(items: list[MediaItem], spec: DatasetSpec, size: tuple[int, int], frame_count: int | None,
                 decode: bool = False) -> list[MediaItem]:
    """The items of one media file with their mask and mask cache set. A problem with the mask raises
    ``MediaError`` (reason and rule) under ``mask_missing = "skip"``; under "unmasked" the items keep the reason
    in ``mask_problem`` and have no ``mask_path``."""
    if not items:
        return items
    first = items[0]
    try:
        mask = find_mask(mask_folder(spec), first.source_stem, spec.is_video)
        check_mask(mask, size, frame_count, decode)
        problem = None
    except MediaError as exc:
        if spec.mask_missing == "skip":
            raise MediaError(f"{exc} ({rule_text('skip')})") from None
        mask, problem = None, str(exc)
    out = []
    for item in items:
        name = mask_cache_name(item.source_stem, *item.cache_size, start=item.start, frames=item.frames)
        out.append(replace(item, mask_path=mask, mask_problem=problem,
                           mask_cache_path=item.latent_cache_path.with_name(name)))
    return out


def to_latent_grid(mask: torch.Tensor, stride: int = VAE_STRIDE[1]) -> torch.Tensor:
    """Pixel weights [F, H, W] (F = 1 or 4n+1; H, W multiples of 8) -> latent weights [1 + (F-1)/4, H/8, W/8]:
    the mean over each VAE cell (frame 0 alone, then groups of 4 frames; 8 x 8 pixels, ``stride`` 16 for the Wan 2.2
    VAE of the TI2V-5B)."""
    frames, height, width = mask.shape
    t, s = VAE_STRIDE[0], stride
    if (frames - 1) % t or height % s or width % s:
        raise ValueError(f"a mask of {frames}x{height}x{width} does not fit the VAE grid (4n+1 frames, sides of 8n)")
    first = F.avg_pool2d(mask[:1, None], s)[:, 0]  # [1, H/8, W/8]
    if frames == 1:
        return first
    rest = mask[1:].reshape(1, 1, frames - 1, height, width)
    rest = F.avg_pool3d(rest, (t, s, s))[0, 0]  # [(F-1)/4, H/8, W/8]
    return torch.cat([first, rest])


def _gray(pixels: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W] in [0, 1] (luminance)."""
    rgb = (pixels.to(torch.float32) + 1.0) / 2.0
    return torch.einsum("c,cfhw->fhw", _LUMA, rgb).clamp_(0.0, 1.0)


def _image_mask(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """A mask image resized and cropped to ``bucket`` as the pixels are: [1, H, W] in [0, 1]."""
    return _gray(frames_to_tensor([resize_to_bucket(load_image(path), bucket)]))


def latent_masks(items: list[MediaItem]) -> Iterator[tuple[MediaItem, torch.Tensor | MediaError]]:
    """``(item, latent mask [F, H/8, W/8] or the MediaError)`` for items of one source that have a ``mask_path``;
    a mask video is decoded once for all the windows (``window_pixels`` on the mask, as for the pixels)."""
    if not items:
        return
    mask = items[0].mask_path
    assert mask is not None
    if not (mask.is_dir() or is_video_file(mask)):
        loaded: dict[tuple[int, int], torch.Tensor] = {}
        for item in items:
            try:
                if item.bucket not in loaded:
                    loaded[item.bucket] = _image_mask(mask, item.bucket)
                pixels = loaded[item.bucket].expand(item.frames or 1, -1, -1)
                yield item, to_latent_grid(pixels, item.latent_stride)
            except MediaError as exc:
                yield item, MediaError(f"unreadable mask {mask.name}: {exc}")
        return
    by_key = {item.key: item for item in items}
    for probe, result in window_pixels([replace(item, path=mask) for item in items]):
        item = by_key[probe.key]
        if isinstance(result, MediaError):
            yield item, MediaError(f"unreadable mask {mask.name}: {result}")
        else:
            yield item, to_latent_grid(_gray(result), item.latent_stride)
