"""Aspect-ratio buckets and the resize + centre crop that puts a frame into its bucket.

Buckets keep about the target area: widths step by 16 (32 for the TI2V-5B's Wan 2.2 VAE) from half the square side up to the side, each
paired with the height that keeps the area (floored to 16), in both orientations. A source goes to the
bucket whose aspect ratio is nearest to its own.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

STEP = 16


def floor_to_step(value: int, step: int = STEP) -> int:
    return value // step * step


def bucket_resolutions(resolution: tuple[int, int], step: int = STEP) -> list[tuple[int, int]]:
    """Every (width, height) bucket around the area of ``resolution``, sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    buckets: set[tuple[int, int]] = set()
    for width in range(floor_to_step(side // 2, step), side + step, step):
        if width <= 0:
            continue
        height = floor_to_step(area // width, step)
        if height > 0:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


class BucketSelector:
    """Maps a source size (width, height) to its bucket (width, height)."""

    def __init__(self, resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool = False, step: int = STEP):
        self.resolution = resolution
        self.step = step
        self.area = resolution[0] * resolution[1]
        self.enable_bucket = enable_bucket
        self.no_upscale = no_upscale and enable_bucket
        self.buckets = bucket_resolutions(resolution, step) if enable_bucket else [resolution]
        self._ratios = np.array([w / h for w, h in self.buckets], dtype=np.float64)

    def select(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"invalid source size {size}")
        if not self.enable_bucket:
            return self.resolution
        if self.no_upscale and width * height < self.area:
            return max(self.step, floor_to_step(width, self.step)), max(self.step, floor_to_step(height, self.step))
        index = int(np.abs(self._ratios - width / height).argmin())
        return self.buckets[index]


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover ``bucket`` (Lanczos when enlarging, box/area when shrinking), then centre crop."""
    width, height = image.size
    bucket_w, bucket_h = bucket
    if (width, height) == (bucket_w, bucket_h):
        return image
    scale = max(bucket_w / width, bucket_h / height)
    new_w = max(bucket_w, int(width * scale + 0.5))
    new_h = max(bucket_h, int(height * scale + 0.5))
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
        image = image.resize((new_w, new_h), resample)
    left = (new_w - bucket_w) // 2
    top = (new_h - bucket_h) // 2
    return image.crop((left, top, left + bucket_w, top + bucket_h))
