"""Merge one or more adapters (LoRA, LoHa, LoKr, with or without DoRA) into a Wan DiT checkpoint file.

    python tools/merge_lora.py --dit DIT.safetensors --lora A.safetensors [--lora B.safetensors]
        [--multiplier 1.0 [--multiplier 0.5]] --out MERGED.safetensors [--dtype bf16]

Each weight becomes what ComfyUI computes at that strength: ``W + m * dW`` (LoRA ``alpha / rank * up @ down``,
LoHa, LoKr), or for DoRA ``W + m * (W' * dora_scale / ||W'|| - W)`` with ``W' = W + dW``. Several files are applied
in order. The sum is computed in fp32 and stored in each weight's own dtype (or --dtype). Key prefixes
(``model.diffusion_model.``) are kept; fp8 checkpoints must be converted to bf16 first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from wantrainer.cli import run_reporting_errors
from wantrainer.errors import UserError
from wantrainer.networks.adapters import module_from_tensors, module_shape
from wantrainer.networks.formats import (
    SAVE_DTYPES,
    kohya_to_path,
    load_lora,
    module_tensors,
    read_safetensors,
)
from wantrainer.utils.atomic import save_safetensors_atomic

DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _weight_key(dit: dict[str, torch.Tensor], path: str) -> str:
    for prefix in DIT_PREFIXES:
        if f"{prefix}{path}.weight" in dit:
            return f"{prefix}{path}.weight"
    raise UserError(f"the DiT has no weight for LoRA module {path!r}; is this LoRA for this model?")


@torch.no_grad()
def merge(dit_path: str, loras: list[str], multipliers: list[float], out: str, dtype: str | None = None) -> int:
    """Write the merged checkpoint; returns the number of weights changed."""
    if len(multipliers) not in (0, 1, len(loras)):
        raise UserError(f"give one --multiplier, or one per --lora ({len(loras)}), not {len(multipliers)}")
    multipliers = multipliers or [1.0]
    if len(multipliers) == 1:
        multipliers = multipliers * len(loras)
    dit, meta = read_safetensors(dit_path)
    if any(k.endswith("scale_weight") for k in dit):
        raise UserError(f"{dit_path} is an fp8 scaled checkpoint; merge into the bf16/fp16 release instead")
    changed: dict[str, torch.Tensor] = {}
    for lora_path, multiplier in zip(loras, multipliers):
        sd, _ = load_lora(lora_path)
        for name, tensors in sorted(module_tensors(sd).items()):
            key = _weight_key(dit, kohya_to_path(name))
            if dit[key].dtype in FP8:
                raise UserError(f"{dit_path}: {key} is fp8; merge into the bf16/fp16 release instead")
            out_features, in_features = module_shape(tensors)
            if (out_features, in_features) != tuple(dit[key].shape):
                raise UserError(f"{lora_path}: {name} is {out_features}x{in_features}, the DiT's {key} is "
                                f"{list(dit[key].shape)}")
            module = module_from_tensors(name, tensors, in_features, out_features)
            module.multiplier = multiplier
            changed[key] = module.merged_weight(changed.get(key, dit[key].float()))
    for key, value in changed.items():
        dit[key] = value.to(dit[key].dtype)
    if dtype is not None:
        dit = {k: v.to(SAVE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in dit.items()}
    save_safetensors_atomic(dit, out, metadata=meta or None)
    return len(changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", required=True, help="DiT checkpoint (single .safetensors file)")
    parser.add_argument("--lora", required=True, action="append",
                        help="LoRA / LoHa / LoKr / DoRA file (repeat for several)")
    parser.add_argument("--multiplier", type=float, action="append", default=[], help="strength (one, or one per --lora)")
    parser.add_argument("--out", required=True, help="merged checkpoint to write")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), help="cast all float tensors (default: keep)")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: f"wrote {args.out}: {merge(args.dit, args.lora, args.multiplier, args.out, args.dtype)} weights "
                f"merged from {len(args.lora)} LoRA file(s)")


if __name__ == "__main__":
    sys.exit(main())
