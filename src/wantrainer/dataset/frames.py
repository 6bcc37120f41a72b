"""Frame windows: which (start, length) clips a video of a given frame count yields in each mode.

Lengths are 4n+1 (Wan's VAE packs 4 frames per latent after the first). ``source_fps`` resampling maps
the model's timeline (16 fps; 24 fps for the TI2V-5B) onto source frame indices.
"""

from __future__ import annotations

import math

import numpy as np

from .blueprint import round_to_4n1

WAN_FPS = 16.0


def frame_windows(
    frame_count: int,
    mode: str,
    target_frames: tuple[int, ...] | list[int],
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[tuple[int, int]]:
    """The (start, length) windows of a video with ``frame_count`` frames, in order, without duplicates.

    head: the first ``t`` frames; middle: ``t`` frames centred; chunk: consecutive non-overlapping pieces;
    slide: a window every ``frame_stride`` frames; uniform: ``frame_sample`` evenly spaced starts;
    full: the whole video up to ``max_frames``. ``t`` runs over ``target_frames`` (rounded to 4n+1).
    """
    if frame_count < 1:
        return []
    if mode == "full":
        return [(0, round_to_4n1(min(frame_count, max_frames)))]
    windows: list[tuple[int, int]] = []
    for target in dict.fromkeys(round_to_4n1(t) for t in target_frames):
        if frame_count < target:
            continue
        if mode == "head":
            windows.append((0, target))
        elif mode == "middle":
            windows.append(((frame_count - target) // 2, target))
        elif mode == "chunk":
            windows.extend((start, target) for start in range(0, frame_count - target + 1, target))
        elif mode == "slide":
            windows.extend((start, target) for start in range(0, frame_count - target + 1, frame_stride))
        elif mode == "uniform":
            starts = np.linspace(0, frame_count - target, frame_sample, dtype=np.int64)
            windows.extend((int(start), target) for start in dict.fromkeys(starts.tolist()))
        else:
            raise ValueError(f"unknown frame_extraction {mode!r}")
    return list(dict.fromkeys(windows))


def resampled_indices(source_count: int, source_fps: float | None, target_fps: float = WAN_FPS) -> list[int]:
    """Source frame index of each frame at ``target_fps`` (16; 24 for the TI2V-5B), identity when ``source_fps`` is
    None."""
    if source_fps is None or source_count < 1:
        return list(range(source_count))
    step = source_fps / target_fps
    count = int(math.floor((source_count - 1) / step + 1e-9)) + 1
    return [min(source_count - 1, int(math.floor(i * step + 1e-9))) for i in range(count)]
