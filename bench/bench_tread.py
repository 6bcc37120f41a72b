"""TREAD token routing: seconds per training step with and without it, side by side in one run.

    .venv/bin/python bench/bench_tread.py kit  [--size 256] [--steps 10] [--warmup 2]
    .venv/bin/python bench/bench_tread.py real [--model wan21_t2v_1.3b] [--size 256] [--steps 3] [--warmup 1]

``kit``: the real trainer (``build_trainer``) on the tiny model kit and a synthetic image set cached at
``--size``; the route (ratio 0.5 over block 0 of the kit's 2 blocks) is switched on and off on alternate
steps, so both settings run under the same machine load. Reports the median wall time of the steps of each
setting (everything the loop does per step) and their ratio.

``real``: a random-weight DiT of a released size (Wan 2.1 T2V 1.3B by default, fp32 on the CPU), LoRA rank 16 on
every block Linear (300 modules at 1.3B), AdamW, gradient checkpointing, one ``--size`` square single frame and a
512-token text context. One step = forward, flow-matching MSE, backward, optimiser step; off and on (ratio
0.5, blocks 2..-2, the "middle blocks") alternate. The trainer adds nothing measurable on top of this step
(``bench/bench_trainer.py``).

Not a test. ``--threads`` sets torch's intra-op threads (default 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import for_benchmark, synthetic_config  # noqa: E402
from wantrainer.core.handlers.base import Handler  # noqa: E402


class Alternate(Handler):
    """Calls ``settings[i % n](trainer)`` before step i and records each step's wall time under its setting."""

    name = "alternate"

    def __init__(self, settings: dict[str, Callable[[object], None]], warmup: int) -> None:
        self.settings = settings
        self.names = list(settings)
        self.warmup = warmup
        self.walls: dict[str, list[float]] = {n: [] for n in self.names}
        self._index = 0
        self._last = 0.0

    def _set_next(self, trainer) -> None:
        self.settings[self.names[self._index % len(self.names)]](trainer)
        self._last = time.perf_counter()

    def on_train_start(self, trainer) -> None:
        self._set_next(trainer)

    def on_step_end(self, trainer) -> None:
        wall = time.perf_counter() - self._last
        name = self.names[self._index % len(self.names)]
        if self._index >= self.warmup * len(self.names):
            self.walls[name].append(wall)
        self._index += 1
        self._set_next(trainer)


def report(walls: dict[str, list[float]], reference: str) -> None:
    medians = {n: statistics.median(w) for n, w in walls.items()}
    for name, median in medians.items():
        each = ", ".join(f"{w:.3f}" for w in walls[name])
        print(f"{name:>12}: median {median:8.3f} s/step  ({each})  ratio {median / medians[reference]:.3f}x")


def kit(args: argparse.Namespace) -> None:
    from wantrainer.core.wan_network_trainer import build_trainer
    from wantrainer.models.wan.token_routing import TokenRoute

    route = TokenRoute(args.ratio, 0, 0)
    settings = {"off": lambda t: t.model.enable_token_routing(None),
                "tread": lambda t: t.model.enable_token_routing(route)}
    with tempfile.TemporaryDirectory(prefix="bench_tread_") as tmp:
        root = Path(tmp)
        cfg = for_benchmark(synthetic_config(root, args.size, 1), 2 * (args.warmup + args.steps), root / "out")
        cfg.model = cfg.model.model_copy(update={"gradient_checkpointing": True})
        cfg.saving = cfg.saving.model_copy(update={"save_loss_plot": False})
        clock = Alternate(settings, args.warmup)
        build_trainer(cfg, extra_handlers=[clock]).train()
    print(f"tiny kit, {args.size}x{args.size} images (batch 1), ratio {args.ratio} over block 0 of 2, "
          f"{torch.get_num_threads()} threads")
    report(clock.walls, "off")


def real_size_step(model_name: str, size: int, rank: int = 16):
    """A random-weight model of a released size with LoRA, AdamW and checkpointing; returns (model, step())."""
    from wantrainer.config.training import NetworkConfig
    from wantrainer.models.wan.configs import WAN_CONFIGS
    from wantrainer.models.wan.transformer import WanModel
    from wantrainer.networks.lora_wan import create_network

    config = WAN_CONFIGS[model_name]
    torch.manual_seed(0)
    start = time.perf_counter()
    model = WanModel(config)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    model.train()
    network = create_network(NetworkConfig(network_dim=rank, network_alpha=float(rank)), model)
    network.apply_to(model)
    network.train()
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(1e-4))
    print(f"{model_name}: built in {time.perf_counter() - start:.1f} s, {len(network.lora_modules)} LoRA modules")
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config.out_dim, 1, size // 8, size // 8, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    context = [torch.randn(config.text_len, config.text_dim, generator=gen)]

    def step() -> float:
        t = torch.rand(1, generator=gen)
        noisy = (1 - t) * latents + t * noise
        begin = time.perf_counter()
        pred = model(noisy, t * 1000, context)
        torch.nn.functional.mse_loss(pred, noise - latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin

    return model, step


def alternate_steps(step: Callable[[], float], settings: dict[str, Callable[[], None]], steps: int,
                    warmup: int) -> dict[str, list[float]]:
    walls: dict[str, list[float]] = {name: [] for name in settings}
    for index in range(warmup + steps):
        for name, apply in settings.items():
            apply()
            wall = step()
            if index >= warmup:
                walls[name].append(wall)
    return walls


def real(args: argparse.Namespace) -> None:
    from wantrainer.models.wan.token_routing import TokenRoute

    model, step = real_size_step(args.model, args.size)
    route = TokenRoute.from_keys(args.ratio, 2, -2, model.config.num_layers)
    settings = {"off": lambda: model.enable_token_routing(None), "tread": lambda: model.enable_token_routing(route)}
    walls = alternate_steps(step, settings, args.steps, args.warmup)
    tokens = (args.size // 16) ** 2
    print(f"{args.model}, {args.size}x{args.size} single frame ({tokens} tokens), LoRA rank 16, AdamW, gradient "
          f"checkpointing, fp32, ratio {args.ratio} over blocks {route.start_block}..{route.end_block}, "
          f"{torch.get_num_threads()} threads")
    report(walls, "off")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("where", choices=["kit", "real"])
    parser.add_argument("--model", default="wan21_t2v_1.3b", help="real: a released size (models/wan/configs.py)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per setting (kit 10, real 3)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps per setting (kit 2, real 1)")
    parser.add_argument("--ratio", type=float, default=0.5, help="tread_selection_ratio (default 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 10 if args.where == "kit" else 3
    if args.warmup is None:
        args.warmup = 2 if args.where == "kit" else 1
    (kit if args.where == "kit" else real)(args)


if __name__ == "__main__":
    main()
