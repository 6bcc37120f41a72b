"""``wantrainer demo``: the whole pipeline on a tiny model and synthetic data, on the CPU, in a few minutes.

1. writes the tiny model kit (DiT, VAE, UMT5, tokenizer in the release layouts) and synthetic media
   (coloured shapes, images and short clips, with captions) plus a held-out set;
2. writes ``demo.toml`` (a normal config: open it to see every setting the demo uses);
3. caches latents and text embeddings (``cache-latents`` / ``cache-text``);
4. trains a LoRA (``train``), measuring the held-out loss at fixed timesteps and fixed noise before and after,
   and renders one sample clip with the trained LoRA at the end;
5. reports the files written and how to open TensorBoard.

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.logger import get_logger, setup_logging

logger = get_logger(__name__)

DEFAULT_STEPS = 60
RESOLUTION = [64, 64]


@dataclass
class DemoResult:
    config: Path
    output_dir: Path
    log_dir: Path
    steps: int
    loss_before: float
    loss_after: float
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def drop(self) -> float:
        """Relative fall of the held-out loss (0.1 = 10 % lower)."""
        return 1.0 - self.loss_after / self.loss_before


def demo_config(root: Path, kit: Any, train_media: Any, val_media: Any, steps: int) -> dict[str, Any]:
    """The demo's config as a TOML mapping (paths relative to ``root``)."""

    def rel(path: Path) -> str:
        return Path(path).relative_to(root).as_posix()

    every = max(1, steps // 4)
    return {
        "dit": rel(kit.dit_wan21),
        "vae": rel(kit.vae),
        "t5": rel(kit.t5),
        "t5_tokenizer": "./" + rel(kit.tokenizer_dir),
        "mixed_precision": "no",
        "max_train_steps": steps,
        "seed": 42,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "network_dim": 8,
        "network_alpha": 8.0,
        "timestep_sampling": "uniform",
        "max_data_loader_n_workers": 0,
        "output_dir": "output",
        "output_name": "demo_lora",
        "save_every_n_steps": max(1, steps // 2),
        "save_state": True,
        "save_last_n_steps": steps,
        "validate_every_n_steps": every,
        "sample_every_n_steps": steps,
        "sample_prompts": [
            {"text": "a red circle moving right on a blue background", "width": 64, "height": 64, "frames": 5,
             "steps": 8, "cfg_scale": 1.0, "seed": 1, "sample_solver": "euler"}
        ],
        "datasets": {
            "general": {"resolution": RESOLUTION, "batch_size": 2},
            "train": [
                {"image_directory": rel(train_media.image_dir), "cache_directory": "cache/train_images"},
                {"video_directory": rel(train_media.video_dir), "cache_directory": "cache/train_videos",
                 "target_frames": [5], "frame_extraction": "head", "batch_size": 1},
            ],
            "val": [{"image_directory": rel(val_media.image_dir), "cache_directory": "cache/val_images"}],
        },
    }


def prepare(root: Path, steps: int) -> Path:
    """Kit, media and ``demo.toml`` in ``root``; returns the config path."""
    from ..config.toml_writer import dump_toml
    from ..utils.atomic import write_text_atomic
    from .synthetic import make_synthetic_dataset
    from .tiny_kit import make_tiny_model_kit

    root.mkdir(parents=True, exist_ok=True)
    kit = make_tiny_model_kit(root / "models", seed=0)
    train = make_synthetic_dataset(root / "data" / "train", seed=0, num_images=6, num_videos=2, video_frames=(9, 17))
    val = make_synthetic_dataset(root / "data" / "val", seed=1, num_images=3, num_videos=0)
    path = root / "demo.toml"
    header = "# Written by `wantrainer demo`: a complete config for the tiny model kit and synthetic data.\n"
    write_text_atomic(path, header + dump_toml(demo_config(root, kit, train, val, steps)))
    return path


def run_demo(root: str | Path, steps: int = DEFAULT_STEPS, extra_handlers: list[Any] | None = None) -> DemoResult:
    """Prepare, cache, train and measure; see the module docstring."""
    from ..caching.cache_latents import cache_latents
    from ..caching.cache_text_encoder_outputs import cache_text
    from ..config_parser import load_config
    from ..core.handlers.validation import ValidationHandler
    from ..core.wan_network_trainer import build_trainer

    root = Path(root).resolve()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    config_path = prepare(root, steps)
    cfg = load_config(config_path)
    seconds["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    cache_latents(cfg)
    cache_text(cfg)
    seconds["cache"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer = build_trainer(cfg, extra_handlers=extra_handlers)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)["val/loss"]
    trainer.train()
    after = probe.evaluate(trainer)["val/loss"]
    seconds["train"] = time.perf_counter() - start
    output_dir = Path(cfg.saving.output_dir)
    files = sorted(p for p in output_dir.rglob("*") if not p.name.startswith(".") and p.parent.name != "logs"
                   and not p.parent.name.endswith("-state"))
    return DemoResult(config_path, output_dir, output_dir / "logs", trainer.state.step, before, after, seconds, files)


def run(args: argparse.Namespace) -> int:
    from ..core.handlers.progress import ProgressBarHandler
    from ..errors import UserError

    setup_logging("WARNING")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    print(f"wantrainer demo: tiny Wan DiT + synthetic shapes in {Path(args.dir).resolve()} ({steps} steps, CPU)")
    result = run_demo(args.dir, steps, extra_handlers=[ProgressBarHandler()])
    t = result.seconds
    print(f"\nheld-out loss at fixed timesteps (100..900) and fixed noise: "
          f"{result.loss_before:.4f} before -> {result.loss_after:.4f} after {result.steps} steps "
          f"({100 * result.drop:.1f}% lower)")
    print(f"time: prepare {t['prepare']:.0f}s, cache {t['cache']:.0f}s, train {t['train']:.0f}s")
    print(f"config: {result.config}")
    print(f"files in {result.output_dir}:")
    for path in result.files:
        print(f"  {path.relative_to(result.output_dir).as_posix()}{'/' if path.is_dir() else ''}")
    print()
    for line in next_commands(result.config, result.log_dir):
        print(line)
    return 0


def next_commands(config: Path, log_dir: Path) -> list[str]:
    """What the demo prints last: commands that work as printed, with or without an activated environment."""
    from ..common.commands import activation_hint, console_command

    lines = [f"look at the curves:  {console_command('tensorboard')} --logdir {log_dir}",
             f"train it yourself:   {console_command('wantrainer')} train --config {config}"]
    hint = activation_hint()
    return lines + ([f"({hint})"] if hint else [])
