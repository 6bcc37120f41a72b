"""Resize a LoRA's rank by SVD of each module's update (LoHa / LoKr files become a LoRA of that rank).

    python tools/resize_lora.py IN.safetensors OUT.safetensors (--rank 8 | --energy 0.95) [--max-rank 64]
        [--dtype bf16]

For each module the update ``dW = alpha / rank * up @ down`` (or the LoHa / LoKr update) is factorised as
``U S V^T``; the kept rank is ``--rank``, or with ``--energy`` the smallest rank whose singular values hold that
fraction of ``sum(S^2)`` (at most ``--max-rank``). The new factors are ``up = U_r sqrt(S_r)``,
``down = sqrt(S_r) V_r^T`` with ``alpha = r`` (scale 1), so every loader applies ``U_r S_r V_r^T``. DoRA
magnitudes (``dora_scale``) are kept. Printed: the kept energy (mean / min over modules) and the relative
Frobenius error of the update, ``||dW - dW_r|| / ||dW||``. The metadata is copied, with ``ss_network_dim`` set to
the new rank (``dynamic`` when ranks differ).
"""

from __future__ import annotations

import argparse
import sys

import torch

from wantrainer.cli import run_reporting_errors
from wantrainer.errors import UserError
from wantrainer.networks.adapters import module_from_tensors, module_shape
from wantrainer.networks.formats import SAVE_DTYPES, load_lora, module_tensors, save_lora


def kept_rank(singular: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    """The rank to keep for one module's singular values."""
    if rank is not None:
        keep = rank
    else:
        share = torch.cumsum(singular.square(), 0) / singular.square().sum().clamp(min=1e-30)
        keep = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
    if max_rank is not None:
        keep = min(keep, max_rank)
    return max(1, min(keep, singular.numel()))


@torch.no_grad()
def resize(src: str, dst: str, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
           dtype: str | None = None) -> dict[str, float]:
    """Write the resized LoRA; returns mean / min kept energy, the largest relative error and the ranks."""
    if (rank is None) == (energy is None):
        raise UserError("give exactly one of --rank N or --energy F (e.g. --energy 0.95)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"--energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    sd, meta = load_lora(src)
    out: dict[str, torch.Tensor] = {}
    energies, errors, ranks = [], [], []
    for name, tensors in sorted(module_tensors(sd).items()):
        out_features, in_features = module_shape(tensors)
        delta = module_from_tensors(name, tensors, in_features, out_features).scaled_delta().double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = kept_rank(s, rank, energy, max_rank)
        total = s.square().sum()
        energies.append(float(s[:r].square().sum() / total) if total > 0 else 1.0)
        errors.append(float(s[r:].square().sum().sqrt() / total.sqrt()) if total > 0 else 0.0)
        ranks.append(r)
        root = s[:r].sqrt()
        out[f"{name}.lora_up.weight"] = (u[:, :r] * root).float()
        out[f"{name}.lora_down.weight"] = (root[:, None] * vh[:r]).float()
        out[f"{name}.alpha"] = torch.tensor(float(r))
        if "dora_scale" in tensors:
            out[f"{name}.dora_scale"] = tensors["dora_scale"].float()
    first = next(v for k, v in sd.items() if not k.endswith((".alpha", ".dora_scale")))
    meta = dict(meta)
    meta["ss_network_dim"] = str(ranks[0]) if len(set(ranks)) == 1 else "dynamic"
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    save_lora(dst, out, meta, dtype=SAVE_DTYPES[dtype] if dtype else first.dtype)
    return {"energy_mean": sum(energies) / len(energies), "energy_min": min(energies),
            "error_max": max(errors), "error_mean": sum(errors) / len(errors),
            "rank_min": min(ranks), "rank_max": max(ranks), "modules": len(ranks)}


def report(dst: str, stats: dict[str, float]) -> str:
    ranks = f"{stats['rank_min']}" if stats["rank_min"] == stats["rank_max"] else \
        f"{stats['rank_min']}-{stats['rank_max']}"
    return (f"wrote {dst}: {stats['modules']} modules, rank {ranks}; kept energy mean {stats['energy_mean']:.4f}, "
            f"min {stats['energy_min']:.4f}; update error ||dW - dW_r|| / ||dW|| mean {stats['error_mean']:.4f}, "
            f"max {stats['error_max']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="input LoRA / LoHa / LoKr file (any supported layout)")
    parser.add_argument("dst", help="output LoRA .safetensors (kohya layout)")
    parser.add_argument("--rank", type=int, help="keep this rank in every module")
    parser.add_argument("--energy", type=float, help="keep the smallest rank holding this share of sum(S^2), e.g. 0.95")
    parser.add_argument("--max-rank", type=int, help="upper bound on the rank with --energy")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), help="dtype of the written weights (default: the input's)")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: report(args.dst, resize(args.src, args.dst, args.rank, args.energy, args.max_rank, args.dtype)))


if __name__ == "__main__":
    sys.exit(main())
