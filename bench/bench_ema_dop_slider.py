"""Step time of EMA, differential output preservation and a concept slider vs plain training, on the tiny kit.

    .venv/bin/python bench/bench_ema_dop_slider.py [--steps 20] [--warmup 3] [--size 64] [--batch 2] [--rounds 3]

Writes the tiny model kit and a synthetic image set (captions with the trigger word "sks") to a temporary folder,
caches them (with the DOP class prompts and the slider's prompts), then trains four ways on the same data,
``--rounds`` times in alternation (so machine load hits all alike): plain, ``enable_ema`` (decay 0.999, on the
device), ``enable_dop`` (class word "shape") and one ``[[slider_pairs]]`` table. Prints the median step wall time
of each and the ratio to plain. fp32 on the CPU. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.config.toml_writer import dump_toml
from wantrainer.config_parser import load_config
from wantrainer.devkit.synthetic import make_synthetic_dataset
from wantrainer.devkit.tiny_kit import make_tiny_model_kit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import step_walls  # noqa: E402

FEATURES = {
    "plain": {},
    "ema": {"enable_ema": True, "ema_decay": 0.999},
    "dop": {"enable_dop": True, "dop_trigger_word": "sks", "dop_class_word": "shape"},
    "slider": {"slider_pairs": [{"target": "a shape", "positive": "a red circle", "negative": "a blue square"}]},
}


def _config(root: Path, kit, media: Path, name: str, args: argparse.Namespace, extra: dict):
    values = {
        "dit": str(kit.dit_wan21), "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "mixed_precision": "no", "network_dim": 16, "network_alpha": 16.0, "max_data_loader_n_workers": 0,
        "max_train_steps": args.steps, "log_with": "none", "output_dir": str(root / "out" / name),
        "datasets": {"train": [{"image_directory": str(media), "cache_directory": str(root / "cache"),
                                "resolution": [args.size, args.size], "batch_size": args.batch}]},
        **extra,
    }
    path = root / f"{name}.toml"
    path.write_text(dump_toml(values), encoding="utf-8")
    return load_config(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kit = make_tiny_model_kit(root / "models")
        media = make_synthetic_dataset(root / "data", num_images=8, num_videos=0).image_dir
        for caption in media.glob("*.txt"):
            caption.write_text("a sks " + caption.read_text().removeprefix("a "), encoding="utf-8")
        configs = {name: _config(root, kit, media, name, args, extra) for name, extra in FEATURES.items()}
        cache_latents(configs["plain"])
        for name in ("dop", "slider"):  # the plain captions, the class prompts, the slider's prompts
            cache_text(configs[name])
        walls: dict[str, list[float]] = {name: [] for name in configs}
        for round_index in range(args.rounds):
            for name, cfg in configs.items():
                out = Path(cfg.saving.output_dir)
                cfg.saving.output_name = f"r{round_index}"
                walls[name] += step_walls(cfg, args.warmup)
                assert out.is_dir()
        medians = {name: statistics.median(times) for name, times in walls.items()}
        for name, median in medians.items():
            print(f"{name:>8}: {median * 1000:8.1f} ms per step, {median / medians['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
