"""Show what a LoRA / LoHa / LoKr / DoRA file contains: layout, type, modules, rank, alpha, dtype, norms, metadata.

    python tools/inspect_lora.py LORA.safetensors [--metadata] [--modules]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from wantrainer.cli import run_reporting_errors
from wantrainer.networks.adapters import module_from_tensors, module_rank, module_shape
from wantrainer.networks.formats import (
    adapter_type,
    detect_layout,
    kohya_to_path,
    module_tensors,
    read_safetensors,
    to_kohya,
)

SHORT_METADATA = (
    "modelspec.architecture", "modelspec.title", "modelspec.date", "modelspec.resolution",
    "modelspec.timestep_range", "ss_base_model_name", "ss_base_model_hash", "ss_steps", "ss_epoch",
    "ss_network_dim", "ss_network_alpha", "ss_use_rslora",
)  # fmt: skip


def describe(path: str, show_metadata: bool = False, show_modules: bool = False) -> list[str]:
    raw, meta = read_safetensors(path)
    layout = detect_layout(list(raw))
    sd = to_kohya(raw, layout)
    modules = module_tensors(sd)
    names = sorted(modules)
    ranks = Counter(module_rank(modules[n]) for n in names)
    alphas = Counter(float(modules[n]["alpha"]) for n in names)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for k, v in raw.items() if not k.endswith(".alpha"))
    lines = [
        f"file:     {path}",
        f"layout:   {layout}",
        f"type:     {adapter_type(sd)}",
        f"modules:  {len(names)} ({len(raw)} tensors)",
        f"rank:     {', '.join(f'{r} x{c}' for r, c in sorted(ranks.items()))}",
        f"alpha:    {', '.join(f'{a:g} x{c}' for a, c in sorted(alphas.items()))}",
        f"dtype:    {', '.join(f'{d} x{c}' for d, c in sorted(dtypes.items()))}",
    ]
    groups = Counter(kohya_to_path(n).split(".", 2)[-1] if n.startswith("lora_unet_blocks_") else kohya_to_path(n)
                     for n in names)  # fmt: skip
    lines.append("targets:  " + ", ".join(f"{g} x{c}" for g, c in sorted(groups.items())))
    norms = []
    for n in names:
        out_features, in_features = module_shape(modules[n])
        module = module_from_tensors(n, modules[n], in_features, out_features)
        norms.append((n, float(module.scaled_delta().detach().float().norm())))
    zero = sum(1 for _, v in norms if v == 0.0)
    if norms:
        mean = sum(v for _, v in norms) / len(norms)
        lines.append(f"|dW| (scaled update, before DoRA): mean {mean:.4g}, max {max(v for _, v in norms):.4g}, "
                     f"zero modules {zero}")
    if show_modules:
        lines += [f"  {kohya_to_path(n):32s} rank {module_rank(modules[n]):>4s}  |dW| {v:.4g}" for n, v in norms]
    keys = sorted(meta) if show_metadata else [k for k in SHORT_METADATA if k in meta]
    if keys:
        lines.append("metadata:")
        for key in keys:
            value = meta[key] if show_metadata or len(meta[key]) < 120 else meta[key][:117] + "..."
            lines.append(f"  {key} = {value}")
    if not show_metadata and meta:
        lines.append(f"  ({len(meta)} metadata keys; --metadata shows all, including the training config)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lora", help="adapter .safetensors file (kohya, diffusion_model or diffusers layout)")
    parser.add_argument("--metadata", action="store_true", help="print every metadata key in full")
    parser.add_argument("--modules", action="store_true", help="list every module with its rank and update norm")
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: "\n".join(describe(args.lora, args.metadata, args.modules)))


if __name__ == "__main__":
    sys.exit(main())
