"""Convert a Wan DiT checkpoint's precision and key layout, one tensor at a time in bounded memory.

Precisions: ``fp32``, ``fp16``, ``bf16`` (every float tensor cast), ``fp8`` (the block Linear weights cast to
float8_e4m3fn, clamped to its range; everything else bf16) and ``fp8_scaled`` (ComfyUI's scaled-fp8 format: each
block Linear weight divided by a float32 scalar ``scale_weight = amax / 448`` before the cast, plus the
``scaled_fp8`` marker tensor; everything else bf16). An fp8 input is dequantised with its stored scale
(``scale_weight`` or ``weight_scale``) first. Layout: the ``model.diffusion_model.`` prefix of ComfyUI's
repackaged files on or off (default: as the input). Reading and writing go through ``utils.safetensors_stream``,
so the resident memory is about two copies of the largest tensor, not the file size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ...errors import UserError
from ...utils.safetensors_stream import DTYPES, PlannedTensor, read_header, read_tensor, write_streamed
from .fp8 import FP8_DTYPE, FP8_MAX, is_fp8_block_linear
from .loading import PREFIXES, infer_wan_config, is_weight_key, strip_prefix

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": FP8_DTYPE,
              "fp8_scaled": FP8_DTYPE}  # fmt: skip
COMFY_PREFIX = PREFIXES[0]
SCALE_NAMES = (".scale_weight", ".weight_scale")
MARKER = "scaled_fp8"


def _out_dtype(key: str, stored: torch.dtype, precision: str) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if precision.startswith("fp8"):
        return FP8_DTYPE if is_fp8_block_linear(key) else torch.bfloat16
    return PRECISIONS[precision]


def plan_conversion(path: str | Path, precision: str, prefix: bool | None) -> tuple[list[PlannedTensor], dict]:
    """(output tensors, context for ``converted_tensors``); checks the file is a Wan DiT."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    stored, meta = read_header(path)
    by_key = {strip_prefix(name): s for name, s in stored.items()}
    weights = {k: s for k, s in by_key.items() if is_weight_key(k)}
    infer_wan_config({k: s.shape for k, s in weights.items()}, str(path))  # a Wan DiT, or a clear error
    had_prefix = any(name.startswith(PREFIXES) for name in stored)
    out_prefix = COMFY_PREFIX if (had_prefix if prefix is None else prefix) else ""
    planned = []
    for key in sorted(weights):
        planned += _planned(key, _out_dtype(key, DTYPES[weights[key].dtype], precision), weights[key].shape,
                            precision, out_prefix)
    if precision == "fp8_scaled":
        planned.append(PlannedTensor(out_prefix + MARKER, FP8_DTYPE, (0,)))
    context = {"path": Path(path), "by_key": by_key, "weights": weights, "prefix": out_prefix,
               "precision": precision, "metadata": meta}  # fmt: skip
    return planned, context


def _dequantised(fh, ctx: dict, key: str) -> torch.Tensor:
    tensor = read_tensor(fh, ctx["weights"][key])
    layer = key.removesuffix(".weight")
    scale = next((ctx["by_key"][layer + s] for s in SCALE_NAMES if layer + s in ctx["by_key"]), None)
    if scale is None or not key.endswith(".weight"):
        return tensor
    return tensor.float() * read_tensor(fh, scale).float().reshape(-1, *([1] * (tensor.ndim - 1)))


def _outputs(key: str, tensor: torch.Tensor, dtype: torch.dtype, precision: str) -> list[tuple[str, torch.Tensor]]:
    """The output tensors for one (dequantised) input tensor, keys without prefix."""
    if dtype == FP8_DTYPE and precision == "fp8_scaled":
        w = tensor.float()
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        return [(key, (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)),
                (key.removesuffix("weight") + "scale_weight", scale.reshape(()))]
    if dtype == FP8_DTYPE:
        return [(key, tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))]
    return [(key, tensor.to(dtype))]


def _planned(key: str, dtype: torch.dtype, shape: tuple[int, ...], precision: str, prefix: str) -> list[PlannedTensor]:
    planned = [PlannedTensor(prefix + key, dtype, shape)]
    if precision == "fp8_scaled" and dtype == FP8_DTYPE:
        planned.append(PlannedTensor(prefix + key.removesuffix("weight") + "scale_weight", torch.float32, ()))
    return planned


def converted_tensors(ctx: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the output tensors in ``plan_conversion`` order, reading one input tensor at a time."""
    precision, prefix = ctx["precision"], ctx["prefix"]
    with open(ctx["path"], "rb") as fh:
        for key in sorted(ctx["weights"]):
            dtype = _out_dtype(key, DTYPES[ctx["weights"][key].dtype], precision)
            for name, tensor in _outputs(key, _dequantised(fh, ctx, key), dtype, precision):
                yield prefix + name, tensor
    if precision == "fp8_scaled":
        yield prefix + MARKER, torch.empty(0, dtype=FP8_DTYPE)


def save_dit_state(state: dict[str, torch.Tensor], path: str | Path, precision: str, comfyui_prefix: bool,
                   metadata: dict[str, str] | None = None) -> None:
    """Write an in-memory DiT state dict (original keys) in ``precision`` and layout, one tensor at a time."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    prefix = COMFY_PREFIX if comfyui_prefix else ""
    keys = sorted(k for k in state if not k.endswith(".scale_weight"))
    dtypes = {k: _out_dtype(k, state[k].dtype, precision) for k in keys}
    planned = [p for k in keys for p in _planned(k, dtypes[k], tuple(state[k].shape), precision, prefix)]
    if precision == "fp8_scaled":
        planned.append(PlannedTensor(prefix + MARKER, FP8_DTYPE, (0,)))

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            for name, tensor in _outputs(key, state[key].detach().to("cpu"), dtypes[key], precision):
                yield prefix + name, tensor
        if precision == "fp8_scaled":
            yield prefix + MARKER, torch.empty(0, dtype=FP8_DTYPE)

    write_streamed(path, planned, produce, metadata=metadata or None)


def convert_dit(src: str | Path, dst: str | Path, precision: str, prefix: bool | None = None) -> int:
    """Write ``src`` converted to ``dst`` (atomically); returns the number of tensors written."""
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError("the output must be a different file from the input")
    planned, ctx = plan_conversion(src, precision, prefix)
    meta = dict(ctx["metadata"])
    write_streamed(dst, planned, lambda: converted_tensors(ctx), metadata=meta or None)
    return len(planned)
