"""One block Linear of the 1.3B DiT stored in each dtype: forward + input-gradient backward, against fp32.

    .venv/bin/python bench/bench_stored_linear.py [--tokens 1024] [--rounds 7] [--threads 2]

The layer is ffn.0 of Wan 2.1 1.3B ([8960, 1536]); the base is frozen, so backward computes the input gradient
only, as in LoRA training. Modes, timed in alternation (median of ``--rounds``): fp32 ``nn.Linear``; bf16 and
fp8_scaled ``StoredLinear`` (upcast into the shared buffer in forward and again in backward, by the C kernel of
``cpu_kernels`` where it is built); the same fp8 layer upcast by torch operations (the kernel's fallback); and
the fp8 path as it was before (a new full-precision copy of the weight per call, which autograd keeps for
backward). Prints wall and CPU ms per forward + backward and the ratios to fp32. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from wantrainer.models.wan import cpu_kernels, stored_linear
from wantrainer.models.wan.fp8 import FP8Linear, quantize_weight
from wantrainer.models.wan.stored_linear import StoredLinear, UpcastBuffers

TORCH_OPS = "fp8_scaled (torch operations)"


class CopyPerCallFP8(torch.nn.Module):
    """The fp8 Linear before shared buffers: ``F.linear(x, weight.to(dtype) * scale)`` on every call."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.scale, self.bias = weight, scale, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None], self.bias)


def build(out_features: int = 8960, in_features: int = 1536) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(in_features, out_features).requires_grad_(False)
    buffers = UpcastBuffers()
    bf16 = StoredLinear(in_features, out_features, storage_dtype=torch.bfloat16)
    bf16.weight.data, bf16.bias.data, bf16.upcast_buffers = plain.weight.data.bfloat16(), plain.bias.data, buffers
    fp8 = FP8Linear(in_features, out_features, scaled=True)
    weight, scale = quantize_weight(plain.weight.data, scaled=True)
    fp8.weight.data, fp8.scale_weight, fp8.bias.data, fp8.upcast_buffers = weight, scale, plain.bias.data, buffers
    return {"fp32": plain, "bf16": bf16, "fp8_scaled": fp8, TORCH_OPS: fp8,
            "fp8_scaled (copy per call, before)": CopyPerCallFP8(weight, scale, plain.bias.data)}  # fmt: skip


def time_once(layer: torch.nn.Module, x: torch.Tensor, torch_ops: bool = False) -> tuple[float, float]:
    """(wall s, CPU s of this process: all threads, user + system) of one forward + backward; ``torch_ops``: the
    fp8 upcast without the C kernel."""
    x = x.detach().requires_grad_(True)
    without_kernel = mock.patch.object(stored_linear, "upcast_e4m3_rows", lambda *a: False)
    with without_kernel if torch_ops else contextlib.nullcontext():
        start, cpu = time.perf_counter(), time.process_time()
        layer(x).sum().backward()
        return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = build()
    x = torch.randn(args.tokens, 1536)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    for name, layer in layers.items():  # warm-up
        time_once(layer, x, name == TORCH_OPS)
    for _ in range(args.rounds):
        for name, layer in layers.items():
            times[name].append(time_once(layer, x, name == TORCH_OPS))
    ref_wall = statistics.median(t[0] for t in times["fp32"])
    ref_cpu = statistics.median(t[1] for t in times["fp32"])
    print(f"ffn.0 of Wan 2.1 1.3B [8960, 1536], {args.tokens} tokens, {args.threads} threads, median of "
          f"{args.rounds} rounds (forward + input-gradient backward); CPU time is less sensitive to other load")
    reason = cpu_kernels.unavailable_reason()
    print("  fp8 upcast: " + ("the C kernel" if reason is None else f"torch operations ({reason})"))
    for name, values in times.items():
        wall, cpu = statistics.median(t[0] for t in values), statistics.median(t[1] for t in values)
        print(f"  {name:36s} wall {1000 * wall:8.1f} ms {wall / ref_wall:5.2f}x fp32   "
              f"CPU {1000 * cpu:8.1f} ms {cpu / ref_cpu:5.2f}x fp32")


if __name__ == "__main__":
    main()
