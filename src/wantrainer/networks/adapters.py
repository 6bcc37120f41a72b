"""What every adapter module shares: wrapping a Linear's ``forward``, DoRA, merging; and LoHa / LoKr.

An adapter module holds the update ``dW`` of one Linear ``W`` ([out, in]) and is applied by replacing the Linear's
``forward`` (never as a child of the DiT), so it works on fp8 Linears and with block swap: the base weight is only
read through the Linear itself (``dense_weight``) when the block is on the compute device.

Updates (``scale = alpha / rank``), in the tensor names of the saved files (those ComfyUI's weight adapters read):

- LoHa: ``dW = scale * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)`` (Hadamard product of two rank-r
  products; ``hada_w*_a`` [out, r], ``hada_w*_b`` [r, in]).
- LoKr: ``dW = scale * kron(lokr_w1, lokr_w2)`` with ``lokr_w2 = lokr_w2_a @ lokr_w2_b`` when it is decomposed
  (rank < half its larger side); when both factors are full matrices the scale is 1 (as ComfyUI applies it).
  ``out = out_l * out_k`` and ``in = in_m * in_n`` are split by ``factorization(dim, factor)``.
- DoRA (``dora_wd``, any algo): ``W' = W + dW`` and the layer uses ``W' * dora_scale / ||W'||`` where the norm is
  taken over the output axis for every input column (``dora_scale`` [1, in], initialised to ``||W||``). The forward
  scales the input instead: ``W' (x * dora_scale / ||W'||)``, so the base Linear (fp8 or not) is still called.
  With a multiplier ``m`` the layer is ``W + m * (W_dora - W)``, ComfyUI's strength rule.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DORA_EPS = float(torch.finfo(torch.float32).eps)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base Linear's weight as float32 [out, in] (an fp8 Linear is dequantised with its scale)."""
    dequantize = getattr(base, "dequantized_weight", None)
    return dequantize(torch.float32) if dequantize is not None else base.weight.float()


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension`` and ``m <= n``: ``m = factor`` when it divides ``dimension``, else
    the most square split whose smaller side is at most ``factor`` (any size with ``factor = -1``)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    best = (1, dimension)
    for m in range(2, math.isqrt(dimension) + 1):
        if m > limit:
            break
        if dimension % m == 0:
            best = (m, dimension // m)
    return best


_WRAP = "_adapter_wrap"  # attribute of a wrapped Linear: (adapter, the forward it wraps)


def _adapted_forward(base: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of a wrapped Linear: one function bound to each (not a closure per layer), so torch.compile
    of the blocks reuses one graph for every block instead of recompiling per wrapped layer."""
    adapter, org_forward = base.__dict__[_WRAP]
    return adapter._forward(base, org_forward, x, *args, **kwargs)


class AdapterModule(nn.Module):
    """Base class: ``scaled_delta()`` gives ``scale * dW`` (float, [out, in]); subclasses may override ``delta``."""

    def __init__(self, lora_name: str, alpha: float, *, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.multiplier = 1.0
        self.module_dropout = module_dropout
        self.dora_scale: nn.Parameter | None = None
        self._wrapped: list[tuple[nn.Module, dict]] = []  # (base Linear, its attributes before wrapping)

    # -- the update ---------------------------------------------------------------------------------------
    def scaled_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def refresh_scale(self) -> None:
        """Recompute the scale from the ``alpha`` buffer (after loading weights)."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier * dW x``."""
        dw = self.scaled_delta()
        return F.linear(x.to(dw.dtype), dw) * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        """``multiplier * dW`` (fp32), what a plain merge adds to the base weight."""
        return self.scaled_delta().float() * self.multiplier

    def enable_dora(self, base_weight: torch.Tensor) -> None:
        """Add the trainable magnitude ``dora_scale`` [1, in] = column norms of the base weight."""
        norm = base_weight.float().norm(dim=0, keepdim=True)
        self.dora_scale = nn.Parameter(norm.detach().cpu().clone())

    # -- applying -----------------------------------------------------------------------------------------
    def _forward(self, base: nn.Module, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0.0:
            return org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org_forward(x, *args, **kwargs)
        if self.dora_scale is None:
            out = org_forward(x, *args, **kwargs)
            return out + self.delta(x).to(out.dtype)
        return self._dora_forward(base, org_forward, x, *args, **kwargs)

    def _dora_forward(self, base: nn.Module, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dw = self.scaled_delta().float()
        merged = dense_weight(base).to(dw.device) + dw  # [out, in]
        ratio = self.dora_scale.float() / (merged.norm(dim=0, keepdim=True) + DORA_EPS)  # [1, in]
        scaled_x = x * ratio.view(-1).to(x.dtype)
        out = org_forward(scaled_x, *args, **kwargs)
        out = out + F.linear(scaled_x.to(dw.dtype), dw).to(out.dtype)
        if self.multiplier != 1.0:
            plain = org_forward(x, *args, **kwargs)
            out = plain + self.multiplier * (out - plain)
        return out

    def wrap(self, base: nn.Module) -> None:
        """Route ``base``'s forward through this adapter (on top of any adapter already wrapping it)."""
        saved = {k: base.__dict__[k] for k in ("forward", _WRAP) if k in base.__dict__}
        base.__dict__[_WRAP] = (self, base.forward)
        base.forward = types.MethodType(_adapted_forward, base)
        self._wrapped.append((base, saved))

    def unwrap(self) -> None:
        for base, saved in reversed(self._wrapped):
            for key in ("forward", _WRAP):
                base.__dict__.pop(key, None)
            base.__dict__.update(saved)
        self._wrapped.clear()

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (fp32 [out, in]) with this adapter merged in, at the current multiplier."""
        weight = weight.float()
        if self.dora_scale is None:
            return weight + self.delta_weight().to(weight.device)
        merged = weight + self.scaled_delta().float().to(weight.device)
        dora = merged * (self.dora_scale.float().to(weight.device) / (merged.norm(dim=0, keepdim=True) + DORA_EPS))
        return weight + self.multiplier * (dora - weight)

    def optimizer_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class LoHaModule(AdapterModule):
    """LoHa: ``dW = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)``; ``hada_w2_a`` starts at zero (dW = 0)."""

    def __init__(self, lora_name: str, in_features: int, out_features: int, rank: int, alpha: float, *,
                 module_dropout: float | None = None, generator: torch.Generator | None = None):
        super().__init__(lora_name, alpha, module_dropout=module_dropout)
        self.rank = rank
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features))
        nn.init.normal_(self.hada_w1_a, std=0.1, generator=generator)
        nn.init.normal_(self.hada_w1_b, std=1.0, generator=generator)
        nn.init.normal_(self.hada_w2_b, std=1.0, generator=generator)
        self.scale = float(alpha) / rank

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha.item()) / self.rank

    def scaled_delta(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


class LoKrModule(AdapterModule):
    """LoKr: ``dW = scale * kron(w1, w2)``; ``w1`` full [out_l, in_m], ``w2`` full or ``w2_a @ w2_b``.

    ``w2`` (or ``w2_b``) starts at zero, so dW = 0 at the start. ``full_matrix`` keeps ``w2`` full at any rank.
    """

    def __init__(self, lora_name: str, in_features: int, out_features: int, rank: int, alpha: float, *,
                 factor: int = -1, full_matrix: bool = False, module_dropout: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(lora_name, alpha, module_dropout=module_dropout)
        out_l, out_k = factorization(out_features, factor)
        in_m, in_n = factorization(in_features, factor)
        self.shape = (out_features, in_features)
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5), generator=generator)
        self.decomposed = not full_matrix and rank < max(out_k, in_n) / 2
        if self.decomposed:
            self.rank = rank
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5), generator=generator)
        else:
            self.rank = None
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n))
        self.refresh_scale()

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha.item()) / self.rank if self.decomposed else 1.0

    def scaled_delta(self) -> torch.Tensor:
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decomposed else self.lokr_w2
        return torch.kron(self.lokr_w1, w2).reshape(self.shape) * self.scale


ADAPTER_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale", "alpha",
)  # fmt: skip
"""Tensor names (after the module name) of the adapters this package trains and reads."""


def adapter_kind(tensors: dict[str, torch.Tensor]) -> str:
    """``"lora"``, ``"loha"`` or ``"lokr"`` from one module's tensors (keys: the suffixes)."""
    if "lora_down.weight" in tensors:
        return "lora"
    if "hada_w1_a" in tensors:
        return "loha"
    if "lokr_w1" in tensors:
        return "lokr"
    raise ValueError(f"no adapter weights among {sorted(tensors)}")


def module_from_tensors(lora_name: str, tensors: dict[str, torch.Tensor], in_features: int,
                        out_features: int) -> AdapterModule:
    """The adapter module that a saved file describes (shapes from its tensors), holding those tensors."""
    from .lora_wan import LoRAModule

    kind = adapter_kind(tensors)
    if kind == "lora":
        rank = tensors["lora_down.weight"].shape[0]
        module: AdapterModule = LoRAModule(lora_name, in_features, out_features, rank, float(tensors["alpha"]))
    elif kind == "loha":
        rank = tensors["hada_w1_b"].shape[0]
        module = LoHaModule(lora_name, in_features, out_features, rank, float(tensors["alpha"]))
    else:
        module = LoKrModule(lora_name, in_features, out_features, 1, float(tensors["alpha"]), full_matrix=True)
        for name in ("lokr_w1", "lokr_w2"):
            delattr(module, name)
        module.decomposed = "lokr_w2_a" in tensors
        module.rank = tensors["lokr_w2_b"].shape[0] if module.decomposed else None
        for name in ("lokr_w1", "lokr_w2_a", "lokr_w2_b") if module.decomposed else ("lokr_w1", "lokr_w2"):
            setattr(module, name, nn.Parameter(torch.empty(tensors[name].shape)))
    if "dora_scale" in tensors:
        module.dora_scale = nn.Parameter(torch.empty(1, in_features))
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype).reshape(own[k].shape) for k, v in tensors.items()})
    module.refresh_scale()
    return module


def module_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(out_features, in_features)`` of the Linear a saved module adapts, from its tensors."""
    kind = adapter_kind(tensors)
    if kind == "lora":
        return tensors["lora_up.weight"].shape[0], tensors["lora_down.weight"].shape[1]
    if kind == "loha":
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]
    w1 = tensors["lokr_w1"]
    w2_out = tensors["lokr_w2"].shape[0] if "lokr_w2" in tensors else tensors["lokr_w2_a"].shape[0]
    w2_in = tensors["lokr_w2"].shape[1] if "lokr_w2" in tensors else tensors["lokr_w2_b"].shape[1]
    return w1.shape[0] * w2_out, w1.shape[1] * w2_in


def module_rank(tensors: dict[str, torch.Tensor]) -> str:
    """The rank of a saved module as text (``"full"`` for a LoKr whose factors are both full matrices)."""
    kind = adapter_kind(tensors)
    if kind == "lora":
        return str(tensors["lora_down.weight"].shape[0])
    if kind == "loha":
        return str(tensors["hada_w1_b"].shape[0])
    return str(tensors["lokr_w2_b"].shape[0]) if "lokr_w2_b" in tensors else "full"
