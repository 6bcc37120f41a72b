"""TI2V-5B objective: forward + backward of an image-to-video item (first frame clean, per-token timesteps, first
frame out of the loss) against a text-to-video item (one timestep per sample) on the same model and latents.

    .venv/bin/python bench/bench_ti2v_objective.py [--layers 4] [--dim 512] [--frames 5] [--size 32] [--reps 5]

The model has the 5B's 48 latent channels at a reduced width (the per-token path adds a timestep embedding and a
modulation per token: its share grows with tokens / width). fp32 on the CPU by default (``--device cuda --dtype
bf16`` on a GPU). Not a test: prints both times and their ratio.
"""

from __future__ import annotations

import argparse

import torch

from bench_dit import DTYPES, step_times
from wantrainer.criteria.objectives import first_frame_inputs
from wantrainer.criteria.training_loss import flow_matching_pair, masked_per_sample_mean
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()

    config = WanModelConfig(dim=args.dim, ffn_dim=args.dim * 4, num_heads=args.dim // 128, num_layers=args.layers,
                            text_dim=4096, in_dim=48, out_dim=48)  # fmt: skip
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = WanModel(config).to_compute_dtype(DTYPES[args.dtype]).to(device).train()
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, 48, args.frames, args.size, args.size)
    latents = torch.randn(shape, generator=gen).to(device)
    noise = torch.randn(shape, generator=gen).to(device)
    context = [torch.randn(64, 4096, generator=gen).to(device) for _ in range(args.batch)]
    t = torch.full((args.batch,), 0.6, device=device)
    noisy, target = flow_matching_pair(latents, noise, t)
    image = first_frame_inputs(latents, noisy, t * 1000, torch.ones(args.batch, dtype=torch.bool, device=device),
                               config.patch_size)  # fmt: skip

    def step(x, timesteps, mask):
        model.zero_grad(set_to_none=True)
        pred = model(x, timesteps, context).float()
        loss = masked_per_sample_mean((pred - target) ** 2, mask).mean()
        loss.backward()

    text_time, image_time = step_times(
        [lambda: step(noisy, t * 1000, None), lambda: step(image.noisy, image.timesteps, image.loss_mask)],
        args.reps, device,
    )
    tokens = args.frames * (args.size // 2) ** 2
    print(f"{args.layers} layers, dim {args.dim}, {tokens} tokens x batch {args.batch}, {args.dtype} on {device}")
    print(f"text-to-video item (timestep [B]):            {text_time * 1000:8.1f} ms")
    print(f"image-to-video item (timesteps [B, L], masked): {image_time * 1000:8.1f} ms")
    print(f"ratio image / text: {image_time / text_time:.3f}")


if __name__ == "__main__":
    main()
