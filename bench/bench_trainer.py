"""Trainer overhead: one training step vs a bare forward + backward of the same model on the same inputs.

    .venv/bin/python bench/bench_trainer.py [--steps 30] [--warmup 5] [--size 64] [--batch 2] [--config X]

Without ``--config`` it writes the tiny model kit and a synthetic image set to a temporary folder, caches
them and benchmarks that (fp32, CPU). With ``--config`` it benchmarks your run (saving, validation and sampling
switched off). Each bare pass replays the inputs of the step before it (``BareForwardBackward``). Prints:

- trainer overhead ratio = median wall time of a training step (data, noise, forward, backward, gradient
  clipping, optimiser, scheduler, metrics, handlers) / median bare forward + backward;
- data-wait fraction = time spent waiting for batches / total step time.

Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wantrainer.config_parser import WanTrainerConfig, load_config
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer


class WallClock(Handler):
    """Wall time between consecutive step ends (everything the loop does per step)."""

    name = "wall_clock"

    def __init__(self) -> None:
        self.walls: list[float] = []
        self._last = 0.0

    def on_train_start(self, trainer) -> None:
        self._last = time.perf_counter()

    def on_step_end(self, trainer) -> None:
        now = time.perf_counter()
        self.walls.append(now - self._last)
        self._last = now


class StepClock(WallClock):
    """Wall time between consecutive step ends (everything the loop does per step) and the data wait.

    After each step it also times one bare forward + backward of that step's inputs (excluded from the next
    step's wall time), so both are measured in alternation under the same machine load.
    """

    name = "step_clock"

    def __init__(self) -> None:
        super().__init__()
        self.bare = BareForwardBackward()
        self.bare_times: list[float] = []
        self.data: list[float] = []

    def on_train_start(self, trainer) -> None:
        super().on_train_start(trainer)
        self.bare.attach(trainer)

    def on_step_end(self, trainer) -> None:
        super().on_step_end(trainer)
        self.data.append(trainer.last_step.timings["data"])
        self.bare_times.append(self.bare(trainer))
        self._last = time.perf_counter()  # the bare pass is not part of the next step


def step_walls(cfg: WanTrainerConfig, warmup: int) -> list[float]:
    """Train ``cfg`` and return the wall time of each step after the first ``warmup``."""
    clock = WallClock()
    build_trainer(cfg, extra_handlers=[clock]).train()
    return clock.walls[warmup:]


def synthetic_config(root: Path, size: int, batch: int) -> WanTrainerConfig:
    from wantrainer.caching.cache_latents import cache_latents
    from wantrainer.caching.cache_text_encoder_outputs import cache_text
    from wantrainer.config.toml_writer import dump_toml
    from wantrainer.devkit.synthetic import make_synthetic_dataset
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    kit = make_tiny_model_kit(root / "models")
    media = make_synthetic_dataset(root / "data", num_images=8, num_videos=0)
    values = {
        "dit": str(kit.dit_wan21), "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "mixed_precision": "no", "network_dim": 16, "network_alpha": 16.0, "max_data_loader_n_workers": 0,
        "output_dir": str(root / "out"),
        "datasets": {"train": [{"image_directory": str(media.image_dir), "cache_directory": str(root / "cache"),
                                "resolution": [size, size], "batch_size": batch}]},
    }  # fmt: skip
    (root / "bench.toml").write_text(dump_toml(values), encoding="utf-8")
    cfg = load_config(root / "bench.toml")
    cache_latents(cfg)
    cache_text(cfg)
    return cfg


def for_benchmark(cfg: WanTrainerConfig, steps: int, out_dir: Path) -> WanTrainerConfig:
    """The config with a fixed step count and nothing but metrics on the side."""
    cfg.training = cfg.training.model_copy(update={"max_train_steps": steps, "max_train_epochs": None})
    cfg.saving = cfg.saving.model_copy(update={
        "output_dir": out_dir, "save_every_n_steps": None, "save_every_n_epochs": None, "save_state": False,
        "resume": None, "auto_resume": False})  # fmt: skip
    cfg.logging = cfg.logging.model_copy(update={"logging_dir": out_dir / "logs"})
    cfg.validation = cfg.validation.model_copy(update={"validate_every_n_steps": None, "validate_on_epoch_end": False})
    cfg.sampling = cfg.sampling.model_copy(update={"sample_every_n_steps": None, "sample_every_n_epochs": None,
                                                   "sample_at_first": False})
    cfg.datasets = cfg.datasets.model_copy(update={"val": []})
    return cfg


class BareForwardBackward:
    """The same model, LoRA and inputs: forward, MSE to the flow target, backward; nothing else.

    Attached to the trainer (``StepClock`` does it at the start of training), each pass replays the model inputs
    of the step that ran just before it: the same noisy latents, timesteps, text and conditioning, since the cost
    of a pass depends on them (at 1.3B the feed-forward GELU and its backward took 2x as long at one step's
    timestep as at another's).
    """

    def __init__(self) -> None:
        self.inputs: tuple | None = None

    def attach(self, trainer) -> None:
        """Record the model inputs of every micro-batch the trainer noises (the last one is replayed)."""
        noised_inputs = trainer._noised_inputs

        def recording(batch, expert):
            ctx = noised_inputs(batch, expert)
            self.inputs = (ctx.noisy.detach(), ctx.timesteps.detach(), batch["text_embeds"], ctx.target.detach(),
                           batch.get("conditioning"))  # fmt: skip
            return ctx

        trainer._noised_inputs = recording

    def __call__(self, trainer) -> float:
        if self.inputs is None:
            raise RuntimeError("BareForwardBackward replays a training step's inputs: attach it and train a step first")
        noisy, timesteps, context, target, conditioning = self.inputs
        start = time.perf_counter()
        pred = trainer.call_model(trainer.model, noisy, timesteps, context, conditioning)
        torch.nn.functional.mse_loss(pred, target).backward()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        elapsed = time.perf_counter() - start
        for group in trainer.groups:
            for p in group.params:
                p.grad = None
        return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="benchmark this config instead of the tiny synthetic run")
    parser.add_argument("--steps", type=int, default=30, help="measured steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps not measured (default 5)")
    parser.add_argument("--size", type=int, default=64, help="synthetic run: image size (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="synthetic run: batch size (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        root = Path(tmp)
        cfg = load_config(args.config) if args.config else synthetic_config(root, args.size, args.batch)
        cfg = for_benchmark(cfg, args.warmup + args.steps, root / "bench_out")
        clock = StepClock()
        trainer = build_trainer(cfg, extra_handlers=[clock])
        trainer.train()
        walls, data = clock.walls[args.warmup:], clock.data[args.warmup:]
        bare = clock.bare_times[args.warmup:]
        step_ms, bare_ms = 1000 * statistics.median(walls), 1000 * statistics.median(bare)
        shape = tuple(clock.bare.inputs[0].shape)
    print(f"batch model input {shape}, {args.steps} measured steps after {args.warmup} warm-up, device {trainer.device}")
    print(f"training step (median)        {step_ms:9.2f} ms")
    print(f"bare forward+backward (median) {bare_ms:8.2f} ms")
    print(f"trainer overhead ratio        {step_ms / bare_ms:9.2f}x")
    print(f"data-wait fraction            {sum(data) / sum(walls):9.1%}")


if __name__ == "__main__":
    main()
