"""Weight storage modes against fp32 at a released DiT size, the models side by side in one process and their
forward + backward passes interleaved.

    .venv/bin/python bench/bench_storage_speed.py [--size 1.3b] [--modes fp32,bf16,fp8,fp8-torch-ops]
        [--rounds 5] [--resolution 256x256] [--frames 1] [--dir DIR]

``bench_real_size.py`` runs its modes one after another, a few minutes each, and a shared machine drifts between
minutes (up to 10 % on a 2-core VM). Here every round runs each mode once on the same inputs (a noisy latent,
timestep and text of the run's shapes, new each round), in an order rotated from round to round, so each ratio
to fp32 is a geometric mean of passes taken seconds apart, with its 95 % interval. Each model is the checkpoint
``bench_real_size.py`` writes (random bf16 weights; written here if ``--dir`` lacks it) loaded with
``dit_weight_dtype`` = the mode, with LoRA rank 16 on the block Linears, gradient checkpointing and fp32 compute;
the pass is the DiT forward, an MSE loss and the backward to the LoRA weights. ``fp8-torch-ops`` is the fp8
model with its CPU upcast done by torch operations instead of the C kernel (``cpu_kernels``). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import SIZES, paired_ratio, write_random_dit  # noqa: E402

TORCH_OPS = "fp8-torch-ops"
TEXT_TOKENS = 24


def load(path: Path, mode: str, rank: int):
    from wantrainer.config.training import NetworkConfig
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.networks.lora_wan import create_network

    model = load_wan_dit(path, dtype=torch.float32, weight_dtype="fp8" if mode == TORCH_OPS else mode)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    network = create_network(NetworkConfig(network_dim=rank, network_alpha=float(rank)), model,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    network.apply_to(model)
    model.train()
    return model, network


def one_pass(model, network, inputs, torch_ops: bool) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one forward + MSE + backward; the LoRA gradients are dropped."""
    from wantrainer.models.wan import stored_linear

    latents, timesteps, context, target = inputs
    patch = mock.patch.object(stored_linear, "upcast_e4m3_rows", lambda *a: False) if torch_ops else None
    with patch or contextlib.nullcontext():
        start, cpu = time.perf_counter(), time.process_time()
        pred = model(latents, timesteps, context)
        torch.nn.functional.mse_loss(pred, target).backward()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for p in network.parameters():
        p.grad = None
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(k for k, v in SIZES.items() if v), default="1.3b")
    parser.add_argument("--modes", default=f"fp32,bf16,fp8,{TORCH_OPS}",
                        help=f"comma-separated, the first the reference: fp32, bf16, fp16, fp8, fp8_scaled, {TORCH_OPS}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolution", default="256x256", type=lambda t: tuple(int(v) for v in t.split("x")))
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/bench_real_size", help="where the random checkpoint is (or goes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from wantrainer.models.wan import cpu_kernels
    from wantrainer.models.wan.configs import WAN_CONFIGS

    shape_name = SIZES[args.size]
    config = WAN_CONFIGS[shape_name]
    path = Path(args.dir) / f"{shape_name}_random_bf16.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_random_dit(path, shape_name)
    modes = args.modes.split(",")
    models = {}
    for mode in modes:
        start = time.perf_counter()
        models[mode] = load(path, mode, args.rank)
        print(f"loaded {mode} in {time.perf_counter() - start:.1f} s", flush=True)
    width, height = args.resolution
    stride = 16 if config.in_dim == 16 else 32  # Wan 2.1 VAE x8 and patch 2; the 5B's Wan 2.2 VAE x16
    latent_shape = (1, config.in_dim, 1 + (args.frames - 1) // 4, height // (stride // 2), width // (stride // 2))
    generator = torch.Generator().manual_seed(0)

    def new_inputs():
        latents = torch.randn(latent_shape, generator=generator)
        timesteps = torch.rand(1, generator=generator) * 1000
        context = [torch.randn(TEXT_TOKENS, config.text_dim, generator=generator)]
        return latents, timesteps, context, torch.randn(latent_shape, generator=generator)

    warm = new_inputs()
    for mode in modes:  # warm-up: buffers, the fp8 kernel's build, allocator
        one_pass(*models[mode], warm, mode == TORCH_OPS)
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for index in range(args.rounds):
        inputs = new_inputs()
        order = modes[index % len(modes):] + modes[:index % len(modes)]
        for mode in order:
            times[mode].append(one_pass(*models[mode], inputs, mode == TORCH_OPS))
        print(f"round {index + 1}: " + ", ".join(f"{m} {times[m][-1][0]:.2f} s" for m in modes), flush=True)
    reason = cpu_kernels.unavailable_reason()
    print(f"\nsize {args.size}, {width}x{height} x {args.frames} frame(s), LoRA rank {args.rank}, gradient checkpointing, "
          f"{args.threads} threads, {args.rounds} interleaved rounds; CPU fp8 upcast: "
          + ("the C kernel" if reason is None else f"torch operations ({reason})"))
    ref = modes[0]
    print(f"| mode | wall s (median) | vs {ref} (95 % interval) | CPU s (median) | CPU vs {ref} |")
    print("|---|---|---|---|---|")
    for mode in modes:
        walls, cpus = [t[0] for t in times[mode]], [t[1] for t in times[mode]]
        wall = paired_ratio(list(zip(walls, [t[0] for t in times[ref]], strict=True)))
        cpu = paired_ratio(list(zip(cpus, [t[1] for t in times[ref]], strict=True)))
        interval = "" if math.isnan(wall[1]) else f" ({wall[1]:.3f}-{wall[2]:.3f})"
        print(f"| {mode} | {statistics.median(walls):.2f} | {wall[0]:.3f}{interval} | {statistics.median(cpus):.2f} | "
              f"{cpu[0]:.3f} |")


if __name__ == "__main__":
    main()
