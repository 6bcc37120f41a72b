"""Linear layers whose weight is stored in one dtype and computed in another (``dit_weight_dtype``).

A ``StoredLinear`` keeps its frozen weight in the storage dtype (bf16, fp16, fp32 or fp8 with an optional
per-output-channel ``scale_weight``) and computes in the dtype of its input (the compute dtype: fp32 on the CPU
with ``mixed_precision = "no"``; the autocast dtype when autocast is on). Each call upcasts the weight into a
scratch tensor that every StoredLinear of a model shares (``UpcastBuffers``: one flat tensor per device and
dtype, sized to the largest weight or row block), so a step allocates nothing for weights, and autograd never
saves an upcast copy: the backward pass upcasts again into the same buffer to compute the input gradient. The number
of upcasts per Linear and step is one per forward (plus one per recomputation under gradient checkpointing)
and one per backward.

On the CPU, for few tokens, a weight of more than ``_CPU_CHUNK_ELEMENTS`` is upcast and multiplied a block of
rows at a time (``cpu_row_chunks``): each block's upcast copy is used by its matmul while it is still in the
cache, instead of a whole upcast weight written to memory and read back (the buffer is then one block, not the
largest weight). The forward writes each block's output columns in place; the backward adds each block's share
of the input gradient, so blocks are used only while the input is no larger than one block. On a GPU the whole
weight is upcast at once.

On the CPU an fp8 (e4m3) weight is upcast by a small C kernel built at first use (``cpu_kernels``: the e4m3
bits shifted into an fp16 pattern and converted by the CPU's vector instruction, exact, one pass). Where it
cannot be built, the same bit arithmetic runs as torch integer operations in cache-sized pieces, each piece's
operations split over torch's threads: about 6x faster than PyTorch's own fp8 conversion, the kernel 2.5-4x
faster again.

Optional fp8 matmul (``fp8_matmul``, CUDA with compute capability >= 8.9): the forward runs ``torch._scaled_mm``
on the stored fp8 weight with the activations quantised to e4m3 per row (scale = row amax / 448); the backward
computes the input gradient in the compute dtype from the upcast weight (as without it), so only the forward
matmul is in fp8. The base weights are frozen: a StoredLinear never computes a weight gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_kernels import upcast_e4m3_rows

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_CPU_PIECE_PER_THREAD = 131072  # elements per thread of one piece of the CPU fp8 upcast (int16 + fp32: 768 KiB,
# in L2): each of the piece's operations is split over torch's threads (docs/benchmarks.md, stored_linear)
_CPU_CHUNK_ELEMENTS = 3 * 2**20  # a weight's rows upcast and multiplied at a time on the CPU (12 MiB in fp32;
# docs/benchmarks.md, stored_linear: faster than the whole weight at once at 256 tokens, slower at 4096)
_FP16_FROM_E4M3 = 256.0  # the e4m3 bits read as fp16 (exponent bias 15 vs 7) are the value / 2**8


class UpcastBuffers:
    """Scratch tensors for upcast weights: one flat tensor per (device, dtype), grown to the largest weight.

    ``allocations`` counts the tensors ever allocated (a step that allocates none keeps it unchanged).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.allocations = 0

    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller one first
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
            self.allocations += 1
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


def upcast_weight_into(weight: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out`` = ``weight`` (times its per-row ``scale``) in ``out``'s dtype; the same numbers as
    ``weight.to(dtype) * scale.to(dtype)[:, None]``."""
    if weight.dtype == torch.float8_e4m3fn and weight.device.type == "cpu":
        return _upcast_e4m3_cpu(weight, scale, out)
    out.copy_(weight)
    if scale is not None:
        out.mul_(scale.to(out.dtype)[:, None])
    return out


def _upcast_e4m3_cpu(weight: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """e4m3 -> fp16 bit pattern by integer ops in cache-sized row pieces, then into ``out`` with the scale; the
    same in one pass by the C kernel of ``cpu_kernels`` where it is built (fp32 ``out``).

    The e4m3 byte sign-extended to int16 and shifted left by 7 puts its exponent and mantissa where fp16 keeps
    them (bit 14 is then cleared); the fp16 number is the e4m3 value / 256, subnormals included."""
    rows, cols = weight.shape
    row_factor = (
        scale.to(out.dtype)[:, None] * _FP16_FROM_E4M3 if scale is not None
        else torch.full((rows, 1), _FP16_FROM_E4M3, dtype=out.dtype)
    )  # fmt: skip
    if upcast_e4m3_rows(weight, row_factor.view(rows), out):  # the C kernel (cpu_kernels), where it is built
        return out
    step = max(1, _CPU_PIECE_PER_THREAD * torch.get_num_threads() // cols)
    bits = weight.view(torch.int8)
    scratch = torch.empty(step * cols, dtype=torch.int16)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        piece = scratch[: (end - start) * cols].view(end - start, cols)
        piece.copy_(bits[start:end])
        piece.bitwise_left_shift_(7).bitwise_and_(-16385)  # clear bit 14 (0xBFFF)
        target = out[start:end]
        target.copy_(piece.view(torch.float16))
        target.mul_(row_factor[start:end])
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cpu_row_chunks(weight: torch.Tensor, tokens: int) -> list[tuple[int, int]]:
    """The (start, end) row blocks a weight is upcast and multiplied in for ``tokens`` input rows: blocks of
    ``_CPU_CHUNK_ELEMENTS // in_features`` rows on the CPU when the weight is larger than one block and the input
    ([tokens, in_features], which the backward adds each block's share into) is no larger; else one block."""
    rows, cols = weight.shape
    one_block = rows * cols <= _CPU_CHUNK_ELEMENTS or tokens * cols > _CPU_CHUNK_ELEMENTS
    if weight.device.type != "cpu" or one_block:
        return [(0, rows)]
    step = max(1, _CPU_CHUNK_ELEMENTS // cols)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _UpcastLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with W upcast into the shared buffer in forward and again in backward (never saved),
    a block of rows at a time where ``cpu_row_chunks`` splits it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, module: StoredLinear, dtype: torch.dtype):
        ctx.module, ctx.dtype, ctx.has_bias = module, dtype, bias is not None
        bias = bias.to(dtype) if bias is not None else None
        chunks = cpu_row_chunks(module.weight, x.numel() // x.shape[-1])
        if len(chunks) == 1:
            return F.linear(x.to(dtype), module.upcast_weight(dtype), bias)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = torch.empty(x2.shape[0], module.out_features, dtype=dtype, device=x.device)
        for start, end in chunks:
            weight = module.upcast_weight(dtype, start, end)
            if bias is None:
                torch.mm(x2, weight.t(), out=out[:, start:end])
            else:
                torch.addmm(bias[start:end], x2, weight.t(), out=out[:, start:end])
        return out.view(*x.shape[:-1], module.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            module, dtype = ctx.module, ctx.dtype
            chunks = cpu_row_chunks(module.weight, grad_out.numel() // grad_out.shape[-1])
            if len(chunks) == 1:
                grad_x = grad_out.to(dtype) @ module.upcast_weight(dtype)  # [..., out] @ [out, in]
            else:
                grad2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
                grad_x = torch.empty(grad2.shape[0], module.in_features, dtype=dtype, device=grad_out.device)
                for index, (start, end) in enumerate(chunks):
                    weight = module.upcast_weight(dtype, start, end)
                    if index == 0:
                        torch.mm(grad2[:, start:end], weight, out=grad_x)
                    else:
                        grad_x.addmm_(grad2[:, start:end], weight)
                grad_x = grad_x.view(*grad_out.shape[:-1], module.in_features)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


class _ScaledMMLinearFunction(torch.autograd.Function):
    """fp8 forward through ``torch._scaled_mm`` (activations quantised per row); backward as the upcast path."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, module: StoredLinear, dtype: torch.dtype):
        ctx.module, ctx.dtype, ctx.has_bias = module, dtype, bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # [M, in]
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [M, 1]
        x8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        w_scale = module.scale_weight if module.scale_weight is not None else module.unit_scale()
        out = torch._scaled_mm(x8, module.weight.t(), scale_a=x_scale, scale_b=w_scale.float()[None, :],
                               out_dtype=dtype)  # fmt: skip
        if bias is not None:
            out = out + bias.to(dtype)
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        return _UpcastLinearFunction.backward(ctx, grad_out)


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is kept in ``storage_dtype`` (optionally with a per-output-channel
    ``scale_weight``, fp8 only) and upcast at each call to the compute dtype (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 storage_dtype: torch.dtype, scaled: bool = False, device=None):  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.requires_grad_(False)
        self.weight.data = self.weight.data.to(storage_dtype)
        self.register_buffer("scale_weight", torch.ones(out_features, device=device) if scaled else None)
        self.upcast_buffers: UpcastBuffers | None = None  # shared by the model (set by ``store_block_linears``)
        self.fp8_matmul = False

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor: the weight upcast to ``dtype`` (times its scale)."""
        out = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        return upcast_weight_into(self.weight, self.scale_weight, out)

    def upcast_weight(self, dtype: torch.dtype, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows ``start:end`` of the weight (all by default) in ``dtype``, in the shared scratch buffer (valid
        until the next StoredLinear call)."""
        weight = self.weight[start:end]
        scale = self.scale_weight[start:end] if self.scale_weight is not None else None
        out = (torch.empty(weight.shape, dtype=dtype, device=weight.device) if self.upcast_buffers is None
               else self.upcast_buffers.get(weight.shape, dtype, weight.device))  # fmt: skip
        return upcast_weight_into(weight, scale, out)

    def unit_scale(self) -> torch.Tensor:
        return torch.ones(self.out_features, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if self.weight.dtype == dtype and self.scale_weight is None:
            bias = self.bias.to(dtype) if self.bias is not None else None
            return F.linear(x.to(dtype), self.weight, bias)
        function = _ScaledMMLinearFunction if self.fp8_matmul else _UpcastLinearFunction
        return function.apply(x, self.bias, self, dtype)

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.scale_weight is not None else ""
        return f"{super().extra_repr()}, storage={str(self.weight.dtype).removeprefix('torch.')}{scaled}"


def check_fp8_matmul_device(device: torch.device | str) -> str | None:
    """None when ``torch._scaled_mm`` fp8 matmuls can run on ``device``, else what is missing."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA GPU (the training device is {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"it needs fp8 tensor cores (compute capability >= 8.9: Ada / Hopper); {name} has {major}.{minor}"
    return None


__all__ = ["FP8_DTYPE", "FP8_DTYPES", "FP8_MAX", "StoredLinear", "UpcastBuffers", "check_fp8_matmul_device",
           "cpu_row_chunks", "upcast_weight_into"]  # fmt: skip
