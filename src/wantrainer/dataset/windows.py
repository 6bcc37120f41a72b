"""The pixels of many windows of one video, decoded in a single pass over the file.

``MediaItem.load_pixels`` decodes a video from its start for every window, so caching the windows of a long clip
one by one costs a time quadratic in its length. ``window_pixels`` reads the frames of all the windows of one
source once: each frame is resized and cropped to the bucket as it is decoded (exactly as ``load_pixels`` does, so
the pixels are identical), kept only while a window still needs it, and each window is handed out as soon as its
last frame is decoded. Memory holds the frames of the windows in progress, not the clip.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import MediaError
from .buckets import resize_to_bucket
from .frames import resampled_indices
from .media import frames_to_tensor, iter_video_frames
from .sources import MediaItem


@dataclass
class _Window:
    item: MediaItem
    indices: list[int]
    """Source frame numbers of the window, in order (repeats when ``source_fps`` is below 16)."""


def source_key(item: MediaItem) -> tuple[Path, float | None, float]:
    """Items with the same key share one decoding pass (the windows of one video, whatever their bucket)."""
    return item.path, item.source_fps, item.model_fps


def window_pixels(items: list[MediaItem]) -> Iterator[tuple[MediaItem, torch.Tensor | MediaError]]:
    """``(item, pixels [3, F, H, W] or the MediaError)`` for every item of one source (see ``source_key``).

    Video windows come in the order their last frame is decoded, from one pass over the file; images are loaded
    one by one. A window the file turns out too short for gets the error; the others are still returned.
    """
    if not items:
        return
    if len({source_key(item) for item in items}) != 1:
        raise ValueError("window_pixels takes the items of one source")
    if not items[0].is_video:
        for item in items:
            try:
                yield item, item.load_pixels()
            except MediaError as exc:
                yield item, exc
        return
    yield from _video_windows(items)


def _plan(items: list[MediaItem]) -> tuple[list[_Window], list[tuple[MediaItem, MediaError]]]:
    """Each window's source frame numbers, sorted by the last one; windows beyond the timeline are errors."""
    windows, errors = [], []
    for item in items:
        assert item.start is not None and item.frames is not None and item.source_frame_count is not None
        timeline = resampled_indices(item.source_frame_count, item.source_fps, item.model_fps)
        end = item.start + item.frames
        if end > len(timeline):
            errors.append((item, MediaError(f"{item.path}: needs frames {item.start}..{end - 1} but has "
                                            f"{len(timeline)}")))
        else:
            windows.append(_Window(item, timeline[item.start:end]))
    windows.sort(key=lambda w: w.indices[-1])
    return windows, errors


def _video_windows(items: list[MediaItem]) -> Iterator[tuple[MediaItem, torch.Tensor | MediaError]]:
    windows, errors = _plan(items)
    yield from errors
    buckets: dict[int, set[tuple[int, int]]] = {}
    """Source frame number -> the buckets the windows that still need it are cut at."""
    for window in windows:
        for index in window.indices:
            buckets.setdefault(index, set()).add(window.item.bucket)
    kept: dict[tuple[int, tuple[int, int]], Image.Image] = {}
    try:
        with closing(iter_video_frames(items[0].path, buckets)) as frames:
            for number, image in frames:
                for bucket in buckets[number]:
                    kept[(number, bucket)] = resize_to_bucket(image, bucket)
                while windows and windows[0].indices[-1] <= number:
                    window = windows.pop(0)
                    bucket = window.item.bucket
                    yield window.item, frames_to_tensor([kept[(i, bucket)] for i in window.indices])
                _forget(kept, windows)
    except MediaError as exc:
        for window in windows:
            yield window.item, exc


def _forget(kept: dict[tuple[int, tuple[int, int]], Image.Image], windows: list[_Window]) -> None:
    """Drop the frames no remaining window needs (windows only move forward through the file)."""
    if not windows:
        kept.clear()
        return
    first = min(window.indices[0] for window in windows)
    for key in [key for key in kept if key[0] < first]:
        del kept[key]
