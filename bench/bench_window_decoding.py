"""Decoding the windows of a long clip: one pass per window (``load_pixels``) vs one pass per file (``window_pixels``).

    .venv/bin/python bench/bench_window_decoding.py [--frames 161] [--stride 8] [--window 17]
                                                    [--size 640x384] [--resolution 512x320] [--reps 3]

Writes one synthetic H.264 clip (a moving gradient and box with grain, so frames do not compress to nothing),
scans it with ``frame_extraction = "slide"`` and times the pixels of every window both ways (what ``cache-latents``
did before and does now), checks they are identical and counts the decoding passes. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.media import count_decode_passes
from wantrainer.dataset.sources import scan_dataset
from wantrainer.dataset.windows import window_pixels
from wantrainer.devkit.synthetic import write_mp4


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def _frames(count: int, width: int, height: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    frames = []
    for i in range(count):
        image = np.broadcast_to((x + y + 3 * i) % 256 * np.array([1.0, 0.6, 0.3]), (height, width, 3)).copy()
        left = (i * 4) % (width - height // 3)
        image[height // 3:2 * height // 3, left:left + height // 3] = (230, 40, 90)
        image += rng.normal(0, 6, image.shape)
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=161)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--window", type=int, default=17, help="window length (4n+1)")
    parser.add_argument("--size", type=_size, default=(640, 384), help="source WxH")
    parser.add_argument("--resolution", type=_size, default=(512, 320), help="bucket WxH")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_windows_"))
    try:
        (root / "videos").mkdir()
        write_mp4(root / "videos" / "long.mp4", _frames(args.frames, *args.size))
        cfg = parse_config({"datasets": {"train": [{
            "video_directory": "videos", "cache_directory": "cache", "resolution": list(args.resolution),
            "target_frames": [args.window], "frame_extraction": "slide", "frame_stride": args.stride}]}},
            config_dir=root)
        (spec,) = resolve_datasets(cfg.datasets, "train")
        items = scan_dataset(spec).items
        results: dict[str, list] = {}
        passes: dict[str, int] = {}

        def per_window():
            results["per window"] = [item.load_pixels() for item in items]

        def one_pass():
            by_key = {item.key: pixels for item, pixels in window_pixels(items)}
            results["one pass"] = [by_key[item.key] for item in items]

        fns = {"per window": per_window, "one pass": one_pass}
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.reps):  # alternate, so a change of machine load hits both alike
            for name, fn in fns.items():
                with count_decode_passes() as counter:
                    start = time.perf_counter()
                    fn()
                    runs[name].append(time.perf_counter() - start)
                passes[name] = sum(counter.values())
        identical = all(torch.equal(a, b) for a, b in zip(results["per window"], results["one pass"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    times = {name: statistics.median(values) for name, values in runs.items()}
    print(f"{args.frames} frames at {args.size[0]}x{args.size[1]} -> {len(items)} windows of {args.window} "
          f"(slide, stride {args.stride}) at {args.resolution[0]}x{args.resolution[1]}; "
          f"pixels identical: {identical}")
    for name, seconds in times.items():
        print(f"  {name:10s} {seconds:7.3f} s  ({passes[name]} decoding pass(es))")
    print(f"  per window / one pass = {times['per window'] / times['one pass']:.2f}x")


if __name__ == "__main__":
    main()
