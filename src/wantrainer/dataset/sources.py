"""Scan a dataset's media: images, videos, frame folders or JSONL lists -> items with buckets and windows.

Each ``MediaItem`` is one training sample: an image, or one frame window of a video. Its ``key`` is the
cache stem (``{stem}`` or ``{stem}_{start:05d}-{frames:03d}``); its latent cache name carries musubi-tuner's
size (``cache_size``, see ``cache_format``), and ``latent_shape`` is what that cache must hold for the current
settings. Unreadable files and videos shorter than every target length are skipped and listed with the reason;
nothing raises for bad media.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.logger import get_logger
from ..errors import MediaError, UserError
from .blueprint import DatasetSpec
from .buckets import BucketSelector, resize_to_bucket
from .cache_format import latent_cache_name, latent_shape, text_cache_name
from .frames import frame_windows, resampled_indices
from .media import (
    broken_links,
    frames_to_tensor,
    list_media,
    load_image,
    no_media_message,
    probe_image,
    probe_video,
    read_video_frames,
)

logger = get_logger(__name__)


@dataclass(frozen=True)
class MediaItem:
    """One sample: an image or one window of a video, with its bucket and cache file paths."""

    key: str
    source_stem: str
    path: Path
    caption: str
    bucket: tuple[int, int]
    """(width, height) the pixels are resized and cropped to."""
    cache_size: tuple[int, int]
    """(width, height) in the latent cache name and metadata, as musubi-tuner writes it: the image's own size; for
    a video the bucket of its frame size with bucketing on and upscaling allowed (see ``cache_format``)."""
    start: int | None
    """First frame of the window (on the 16 fps timeline when ``source_fps`` is set); None for images."""
    frames: int | None
    """Window length (4n+1); None for images."""
    latent_cache_path: Path
    text_cache_path: Path
    source_fps: float | None = None
    source_frame_count: int | None = None
    """Videos: frames in the source file (before ``source_fps`` resampling)."""
    caption_missing: bool = False
    mask_path: Path | None = None
    """The item's loss mask file (``dataset.masks``); None without masks or when its mask has a problem."""
    mask_cache_path: Path | None = None
    """Where its latent-resolution mask is cached (every item of a dataset with ``mask_directory``)."""
    mask_problem: str | None = None
    """Why the mask is not used (missing, unreadable, mis-sized) when the item trains unmasked."""
    latent_stride: int = 8
    """Pixels per latent cell: 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE of TI2V-5B)."""
    model_fps: float = 16.0
    """Frame rate ``source_fps`` resamples to (24 for the TI2V-5B)."""

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(F, H, W) the latent cache must hold: the bucket / 8 (16 for the Wan 2.2 VAE) and (frames - 1) // 4 + 1
        latent frames."""
        return latent_shape(*self.bucket, self.frames, stride=self.latent_stride)

    def load_pixels(self) -> torch.Tensor:
        """float32 [3, F, H, W] in [-1, 1] at the bucket size (F = 1 for images). Raises ``MediaError``."""
        if self.frames is None:
            images = [load_image(self.path)]
        else:
            assert self.start is not None and self.source_frame_count is not None
            timeline = resampled_indices(self.source_frame_count, self.source_fps, self.model_fps)
            end = self.start + self.frames
            if end > len(timeline):
                raise MediaError(f"{self.path}: needs frames {self.start}..{end - 1} but has {len(timeline)}")
            images = read_video_frames(self.path, timeline[self.start:end])
        return frames_to_tensor([resize_to_bucket(image, self.bucket) for image in images])


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class DatasetScan:
    """What a dataset's media folder or JSONL file holds."""

    items: list[MediaItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    frame_counts: dict[Path, int] = field(default_factory=dict)
    """Videos only: usable frame count of each readable video (after ``source_fps`` resampling)."""
    sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    """Source (width, height) of each readable file."""
    unmasked: list[SkippedFile] = field(default_factory=list)
    """Media whose mask is missing, unreadable or mis-sized, trained unmasked (``mask_missing = "unmasked"``)."""


@dataclass(frozen=True)
class _Source:
    path: Path
    caption: str | None
    """None when no caption was found."""


def _read_caption(media: Path, extension: str) -> str | None:
    caption_file = media.parent / f"{media.name if media.is_dir() else media.stem}{extension}"
    if not caption_file.is_file():
        return None
    return caption_file.read_text(encoding="utf-8", errors="replace").strip()


def _directory_sources(folder: Path, spec: DatasetSpec, skipped: list[SkippedFile]) -> list[_Source]:
    if not folder.is_dir():
        raise UserError(f"`{spec.name}`: media folder {folder} does not exist")
    media = list_media(folder, spec.is_video)
    for link in broken_links(folder, spec.is_video):
        skipped.append(SkippedFile(link, f"broken symbolic link: its target {os.readlink(link)} does not exist"))
    if not media:
        raise UserError(f"`{spec.name}`: {no_media_message(folder, spec.is_video)}")
    return [_Source(p, _read_caption(p, spec.caption_extension)) for p in media]


def _jsonl_sources(jsonl: Path, spec: DatasetSpec, skipped: list[SkippedFile]) -> list[_Source]:
    if not jsonl.is_file():
        raise UserError(f"`{spec.name}`: JSONL file {jsonl} does not exist")
    key = "video_path" if spec.is_video else "image_path"
    sources: list[_Source] = []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(SkippedFile(jsonl, f"line {number}: not JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            skipped.append(SkippedFile(jsonl, f"line {number}: no \"{key}\" string"))
            continue
        path = Path(record[key]).expanduser()
        path = path if path.is_absolute() else (jsonl.parent / path)
        if not path.exists():
            skipped.append(SkippedFile(path, f"file not found ({jsonl.name} line {number})"))
            continue
        caption = record.get("caption")
        sources.append(_Source(path, str(caption).strip() if caption is not None else None))
    return sources


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _items_for(source: _Source, spec: DatasetSpec, selector: BucketSelector, scan: DatasetScan,
               decode: bool = False) -> list[MediaItem]:
    stem = _stem(source.path)
    caption = source.caption or ""
    text_cache = spec.cache_directory / text_cache_name(stem)
    common = dict(source_stem=stem, path=source.path, caption=caption, text_cache_path=text_cache,
                  caption_missing=source.caption is None, latent_stride=spec.latent_stride)
    if not spec.is_video:
        size = probe_image(source.path, decode=decode)
        scan.sizes[source.path] = size
        bucket = selector.select(size)
        latent = spec.cache_directory / latent_cache_name(stem, *size)
        return [MediaItem(key=stem, bucket=bucket, cache_size=size, start=None, frames=None, latent_cache_path=latent,
                          **common)]
    info = probe_video(source.path)
    count = len(resampled_indices(info.frame_count, spec.source_fps, spec.model_fps))
    scan.sizes[source.path] = (info.width, info.height)
    scan.frame_counts[source.path] = count
    bucket = selector.select((info.width, info.height))
    # musubi-tuner reads video frames resized to the bucket of their size (bucketing on, upscaling allowed, whatever
    # the dataset says) and names the cache with that size
    cache_size = BucketSelector(spec.resolution, enable_bucket=True, step=selector.step).select((info.width, info.height))
    windows = frame_windows(count, spec.frame_extraction, spec.target_frames, spec.frame_stride,
                            spec.frame_sample, spec.max_frames)
    if not windows:
        targets = ", ".join(str(t) for t in spec.target_frames)
        raise MediaError(f"too short: {count} frames, fewer than every target length ({targets})")
    return [
        MediaItem(
            key=f"{stem}_{start:05d}-{length:03d}", bucket=bucket, cache_size=cache_size, start=start, frames=length,
            latent_cache_path=spec.cache_directory / latent_cache_name(stem, *cache_size, start=start, frames=length),
            source_fps=spec.source_fps, source_frame_count=info.frame_count, model_fps=spec.model_fps, **common,
        )
        for start, length in windows
    ]


def scan_dataset(spec: DatasetSpec, *, decode_images: bool = False) -> DatasetScan:
    """Find every item of ``spec``. Raises ``UserError`` only when the folder or JSONL file is missing.

    ``decode_images`` decodes every image instead of checking its header (``doctor``: it then finds the
    truncated files that caching would find)."""
    scan = DatasetScan()
    source_path = spec.source
    if spec.image_jsonl_file is not None or spec.video_jsonl_file is not None:
        sources = _jsonl_sources(source_path, spec, scan.skipped)
    else:
        sources = _directory_sources(source_path, spec, scan.skipped)
    selector = BucketSelector(spec.resolution, spec.enable_bucket, spec.bucket_no_upscale, step=2 * spec.latent_stride)
    stems: dict[str, Path] = {}
    for source in sources:
        stem = _stem(source.path)
        if stem in stems:
            scan.skipped.append(SkippedFile(source.path, f"same name as {stems[stem].name}: their caches would "
                                                         "collide; rename one"))
            continue
        try:
            items = _items_for(source, spec, selector, scan, decode_images)
            if spec.mask_directory is not None:
                items = _with_masks(items, spec, scan, decode_images)
        except MediaError as exc:
            scan.skipped.append(SkippedFile(source.path, str(exc)))
            continue
        stems[stem] = source.path
        scan.items.extend(items)
        if source.caption is None:
            scan.missing_captions.append(source.path)
    _log_summary(spec, scan)
    return scan


def _with_masks(items: list[MediaItem], spec: DatasetSpec, scan: DatasetScan, decode: bool) -> list[MediaItem]:
    from .masks import attach_masks  # masks builds on this module

    if not items:
        return items
    path = items[0].path
    items = attach_masks(items, spec, scan.sizes[path], items[0].source_frame_count, decode)
    if items[0].mask_problem is not None:
        scan.unmasked.append(SkippedFile(path, items[0].mask_problem))
    return items


def no_items_reason(spec: DatasetSpec, scan: DatasetScan) -> str | None:
    """Why a scanned dataset gives no item, saying what was found and what to change; None when it has items."""
    if scan.items:
        return None
    where = f"`{spec.name}` ({spec.source})"
    short = {p: n for p, n in scan.frame_counts.items() if n}
    if spec.is_video and short:
        longest = max(short.values())
        targets = ", ".join(str(t) for t in spec.target_frames)
        need = min(spec.target_frames)
        return (f"{where} has no usable clip: {len(short)} clip(s), the longest {longest} frames; target_frames "
                f"[{targets}] needs at least {need}: lower target_frames (to {max(1, (longest - 1) // 4 * 4 + 1)} or "
                f"less), or use frame_extraction = \"full\" (the whole clip, rounded down to 4k+1 frames)")
    if scan.skipped:
        first = scan.skipped[0]
        return (f"{where} has no usable file: {len(scan.skipped)} skipped, e.g. {first.path.name}: {first.reason} "
                "(`wantrainer doctor` lists them all)")
    return f"{where} has no media"


def _log_summary(spec: DatasetSpec, scan: DatasetScan) -> None:
    if scan.missing_captions:
        first = scan.missing_captions[0]
        if spec.image_jsonl_file is not None or spec.video_jsonl_file is not None:
            fix = "give its line a \"caption\""
        else:
            fix = f"write its caption in {first.parent / (first.name if first.is_dir() else first.stem)}" \
                  f"{spec.caption_extension}"
        logger.warning("%s: %d file(s) have no caption (trained with an empty caption), e.g. %s: %s",
                       spec.name, len(scan.missing_captions), first, fix)
    for skipped in scan.skipped:
        logger.warning("%s: skipped %s: %s", spec.name, skipped.path, skipped.reason)
    for unmasked in scan.unmasked:
        logger.warning("%s: %s: %s (mask_missing = \"unmasked\": trained on the whole frame)", spec.name,
                       unmasked.path, unmasked.reason)
    logger.info("%s: %d item(s), %d skipped, %d without caption", spec.name, len(scan.items),
                len(scan.skipped), len(scan.missing_captions))
