"""Step time of masked training, and of its prior preservation (one extra no-grad forward), vs plain training.

    .venv/bin/python bench/bench_masked_prior.py [--steps 20] [--warmup 3] [--size 64] [--batch 2] [--rounds 3]

Writes the tiny model kit, a synthetic image set and left-half masks to a temporary folder, caches them, then
trains three ways on the same data, ``--rounds`` times in alternation (so machine load hits all alike): plain
(no masks), masked (``unmasked_weight = 0``, no prior term) and masked with ``masked_prior_preservation_weight
= 1``. Prints the median step wall time of each and the ratios to plain. fp32 on the CPU. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.config.toml_writer import dump_toml
from wantrainer.config_parser import load_config
from wantrainer.devkit.synthetic import make_synthetic_dataset
from wantrainer.devkit.tiny_kit import make_tiny_model_kit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import step_walls  # noqa: E402


def _values(root: Path, kit, media: Path, size: int, batch: int, steps: int, masks: Path | None,
            prior: float) -> dict:
    train = {"image_directory": str(media), "cache_directory": str(root / "cache"), "resolution": [size, size],
             "batch_size": batch}
    values = {
        "dit": str(kit.dit_wan21), "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "mixed_precision": "no", "network_dim": 16, "network_alpha": 16.0, "max_data_loader_n_workers": 0,
        "max_train_steps": steps, "log_with": "none", "output_dir": str(root / "out"), "overwrite_output": True, "datasets": {"train": [train]},
    }  # fmt: skip
    if masks is not None:
        train["mask_directory"] = str(masks)
        values.update(use_masked_training_with_prior=True, masked_prior_preservation_weight=prior)
    return values


def _config(root: Path, name: str, values: dict):
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
        masks = root / "masks"
        masks.mkdir()
        for image in sorted(media.glob("*.png")):
            width, height = Image.open(image).size
            array = np.zeros((height, width), np.uint8)
            array[:, : width // 2] = 255
            Image.fromarray(array, mode="L").save(masks / image.name)
        runs = {"plain": (None, 0.0), "masked": (masks, 0.0), "masked + prior": (masks, 1.0)}
        configs = {name: _config(root, name.replace(" + ", "_"), _values(root, kit, media, args.size, args.batch,
                                                                        args.steps, m, p))
                   for name, (m, p) in runs.items()}
        cache_latents(configs["masked"])
        cache_text(configs["masked"])
        walls: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, cfg in configs.items():
                walls[name] += step_walls(cfg, args.warmup)
        medians = {name: statistics.median(times) for name, times in walls.items()}
        for name, median in medians.items():
            print(f"{name:>15}: {median * 1000:8.1f} ms per step, {median / medians['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
