"""Overhead of the alignment / self-correction plug-ins: seconds per training step with and without each.

    .venv/bin/python bench/bench_enhancements.py [--steps 20] [--warmup 3] [--rounds 3]

Writes the tiny model kit (with its tiny DINOv2) and a synthetic set of 4 images and 2 clips (5 frames) to a
temporary folder, caches latents, captions and REPA features, then trains the same run with each variant
(baseline, REPA, REPA + CREPA, self-correction) in turn, ``--rounds`` times interleaved so that machine load hits
them alike. Prints the median s/step of each and its ratio to the baseline measured in the same rounds.

Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from wantrainer.config.toml_writer import dump_toml
from wantrainer.config_parser import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import step_walls  # noqa: E402

VARIANTS: dict[str, dict] = {
    "baseline": {},
    "repa": {"enable_repa": True, "repa_alignment_depth": 1, "repa_projector_hidden_dim": 256},
    "repa+crepa": {"enable_repa": True, "repa_alignment_depth": 1, "repa_projector_hidden_dim": 256,
                   "crepa_enabled": True},
    "self_correction": {"self_correction_enabled": True, "self_correction_every": 1,
                        "self_correction_batch_ratio": 0.5, "self_correction_rollout_steps": 2},
}


def workspace(root: Path) -> dict:
    from wantrainer.caching.cache_latents import cache_latents
    from wantrainer.caching.cache_text_encoder_outputs import cache_text
    from wantrainer.devkit.synthetic import make_synthetic_dataset
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    kit = make_tiny_model_kit(root / "models")
    media = make_synthetic_dataset(root / "data", num_images=4, num_videos=2, video_frames=(9, 13))
    values = {
        "dit": str(kit.dit_wan21), "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "mixed_precision": "no", "network_dim": 16, "network_alpha": 16.0, "max_data_loader_n_workers": 0,
        "log_with": "none", "repa_encoder_name": str(kit.dinov2), "seed": 3,
        "datasets": {"train": [
            {"image_directory": str(media.image_dir), "cache_directory": str(root / "cache"),
             "resolution": [64, 64], "batch_size": 2},
            {"video_directory": str(media.video_dir), "cache_directory": str(root / "vcache"),
             "resolution": [64, 64], "batch_size": 2, "target_frames": [5]}]},
    }  # fmt: skip
    (root / "cache.toml").write_text(dump_toml({**values, "enable_repa": True}), encoding="utf-8")
    cfg = load_config(root / "cache.toml")
    cache_latents(cfg)  # latents and REPA features
    cache_text(cfg)
    return values


def seconds_per_step(root: Path, values: dict, variant: str, steps: int, warmup: int, round_: int) -> float:
    extra = VARIANTS[variant]
    run = {**values, **extra, "max_train_steps": warmup + steps, "output_dir": str(root / f"out_{variant}_{round_}")}
    if "enable_repa" not in extra:
        run.pop("repa_encoder_name")
    path = root / f"{variant}_{round_}.toml"
    path.write_text(dump_toml(run), encoding="utf-8")
    return statistics.median(step_walls(load_config(path), warmup))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps not measured (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    names = ["baseline", *[v for v in args.variants if v != "baseline"]]
    with tempfile.TemporaryDirectory(prefix="bench_enhancements_") as tmp:
        root = Path(tmp)
        values = workspace(root)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names:
                times[name].append(seconds_per_step(root, values, name, args.steps, args.warmup, round_))
    base = statistics.median(times["baseline"])
    print(f"tiny kit, CPU fp32, batch 2 (64 x 64 images, 5-frame clips), median of {args.rounds} rounds x "
          f"{args.steps} steps")
    for name in names:
        t = statistics.median(times[name])
        print(f"{name:16s} {t * 1000:8.1f} ms/step   x{t / base:5.2f}")


if __name__ == "__main__":
    main()
