"""Latent caching throughput vs calling the VAE directly on the same clips.

    .venv/bin/python bench/bench_caching.py [--clips 6] [--frames 17] [--size 64] [--workers 2] [--batch 1]
                                            [--vae PATH] [--device cpu] [--reps 3] [--threads N]

Builds the tiny kit (or uses ``--vae``) and synthetic clips in a temporary folder, then times
(a) ``cache_latents`` end to end (scan, decode with ``--workers`` threads, encode, atomic writes),
(b) the same VAE encoding pixels already in memory (the floor), and
(c) a plain loop that decodes then encodes each clip with no prefetching.
Not a test: prints items/s and the ratios.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wantrainer.caching.cache_latents import cache_latents, load_vae
from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.sources import scan_dataset
from wantrainer.devkit.synthetic import make_synthetic_dataset
from wantrainer.devkit.tiny_kit import make_tiny_model_kit


def _config(root: Path, vae: Path, args):
    return parse_config({
        "vae": str(vae),
        "datasets": {
            "train": [{"video_directory": "videos", "cache_directory": "cache", "resolution": args.size,
                       "target_frames": [args.frames]}],
            "latent_cache": {"device": args.device, "batch_size": args.batch, "num_workers": args.workers,
                             "skip_existing": False},
        },
    }, config_dir=root)


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=17, help="window length (4n+1); clips are longer")
    parser.add_argument("--size", type=int, default=64, help="square resolution")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vae", type=Path, default=None, help="a real Wan VAE file (default: the tiny kit's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench_caching_"))
    try:
        vae_path = args.vae or make_tiny_model_kit(root / "kit").vae
        make_synthetic_dataset(root, seed=0, num_images=0, num_videos=args.clips,
                               video_frames=(args.frames, args.frames + 8))
        cfg = _config(root, vae_path, args)
        items = [i for s in resolve_datasets(cfg.datasets, "train") for i in scan_dataset(s).items]
        vae = load_vae(vae_path, cfg.datasets.latent_cache, torch.device(args.device))
        pixels = [item.load_pixels()[None] for item in items]
        vae.encode(pixels[0])  # warm-up

        def direct_encode():
            for p in pixels:
                vae.encode(p)

        def decode_then_encode():
            for item in items:
                vae.encode(item.load_pixels()[None])

        def cached():
            shutil.rmtree(root / "cache", ignore_errors=True)
            summary = cache_latents(cfg)
            assert summary.cached == len(items), summary.lines()

        fns = {"vae only": direct_encode, "decode+encode loop": decode_then_encode, "cache_latents": cached}
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.reps):  # alternate, so a change of machine load hits every variant alike
            for name, fn in fns.items():
                runs[name].append(_timed(fn, args.device))
        times = {name: statistics.median(values) for name, values in runs.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = len(items)
    print(f"{n} clips of {args.frames} frames at {args.size}x{args.size}, device {args.device}, "
          f"batch {args.batch}, workers {args.workers}, {torch.get_num_threads()} torch thread(s), VAE {vae_path.name}")
    for name, seconds in times.items():
        print(f"  {name:20s} {seconds:7.3f} s  {n / seconds:7.2f} items/s")
    print(f"  cache_latents / vae only           = {times['cache_latents'] / times['vae only']:.2f}x")
    print(f"  cache_latents / decode+encode loop = {times['cache_latents'] / times['decode+encode loop']:.2f}x")


if __name__ == "__main__":
    main()
