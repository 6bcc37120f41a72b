"""Forward + backward time of our Wan DiT vs diffusers' WanTransformer3DModel on the same weights and inputs.

    .venv/bin/python bench/bench_dit.py [--layers 4] [--dim 512] [--frames 5] [--size 32] [--reps 3]

fp32 on the CPU by default (``--device cuda --dtype bf16`` on a GPU). Not a test: prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args) -> tuple[WanModel, WanTransformer3DModel, WanModelConfig]:
    config = WanModelConfig(
        dim=args.dim,
        ffn_dim=args.dim * 4,
        num_heads=args.dim // 128,
        num_layers=args.layers,
        text_dim=args.text_dim,
    )
    torch.manual_seed(0)
    ours = WanModel(config)
    ref = WanTransformer3DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.head_dim, text_dim=config.text_dim,
        ffn_dim=config.ffn_dim, num_layers=config.num_layers, in_channels=config.in_dim, out_channels=config.out_dim,
    )  # fmt: skip
    ref.load_state_dict(
        convert_wan_transformer_to_diffusers({k: v.clone() for k, v in ours.state_dict().items()})
    )
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    ours.to_compute_dtype(dtype).to(device)
    ref.to(device)
    if dtype != torch.float32:  # diffusers keeps its own fp32 modules only when loading with torch_dtype
        ref.to(dtype)
    return ours, ref, config


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(fns, reps: int, device: torch.device) -> list[float]:
    """Best-of-``reps`` seconds of each of ``fns``, alternating between them (robust to other load)."""
    for fn in fns:  # warm-up
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            out.append(_timed(fn, device))
    return [min(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, ref, config = build(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 16, args.frames, args.size, args.size, generator=gen).to(device)
    timestep = torch.full((args.batch,), 500.0, device=device)
    context = [torch.randn(120, config.text_dim, generator=gen).to(device) for _ in range(args.batch)]
    padded = torch.zeros(args.batch, 512, config.text_dim, device=device)
    for i, c in enumerate(context):
        padded[i, : c.shape[0]] = c

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(x, timestep, context).float().square().mean().backward()

    def ref_step():
        ref.zero_grad(set_to_none=True)
        ref(x.to(dtype), timestep, padded.to(dtype), return_dict=False)[0].float().square().mean().backward()

    with torch.no_grad():
        diff = (
            ours(x, timestep, context) - ref(x.to(dtype), timestep, padded.to(dtype), return_dict=False)[0]
        ).abs()
    tokens = (args.frames * args.size * args.size) // 4
    print(f"config: {args.layers} layers, dim {args.dim}, {config.num_heads} heads, ffn {config.ffn_dim}, "
          f"{tokens} tokens x batch {args.batch}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads; max |ours - diffusers| = {diff.max().item():.2e}")  # fmt: skip
    t_ours, t_ref = step_times([ours_step, ref_step], args.reps, device)
    print(f"forward+backward  ours {t_ours * 1000:.1f} ms   diffusers {t_ref * 1000:.1f} ms   "
          f"ratio ours/diffusers {t_ours / t_ref:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
