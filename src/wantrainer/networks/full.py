"""Full fine-tuning (``network_module = "full"``): train the DiT's own weights, all or those matching a regex.

``FullNetwork`` has the interface of the LoRA network (``apply_to``, ``remove``, ``prepare_optimizer_params``,
``state_dict``, ``save_weights``), so the loop, checkpointing, resume and DDP treat it the same way.

Precision: the optimiser always works on float32 master weights. When the DiT's trained parameters are float32
(``mixed_precision = "no"``) the masters are those parameters. When they are bf16 / fp16, each trained parameter
gets a float32 master copy: gradients are accumulated into the master in float32 as they arrive (a
post-accumulate-grad hook, which also frees the low-precision gradient) and the bf16 weight is refreshed from the
master (rounded to nearest) before the next forward pass. So the optimiser state is float32 too, and updates
smaller than a bf16 step are not lost (``docs/full_finetune.md`` has the measurement).

Saved: a DiT file in the original key layout (``model.diffusion_model.`` prefix or none), bf16 / fp16 / fp32 or
ComfyUI's fp8_scaled, which ``load_wan_dit``, ComfyUI and diffusers' single-file converter read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.logger import get_logger
from ..errors import UserError

logger = get_logger(__name__)


def select_parameters(dit: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters to train: all, or those whose full name matches one of ``patterns``."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UserError(f"trainable_blocks: bad regex {pattern!r}: {exc}") from None
    names = [n for n, _ in dit.named_parameters() if not compiled or any(c.fullmatch(n) for c in compiled)]
    if not names:
        raise UserError("trainable_blocks matches no parameter of the DiT (patterns must match whole names such as "
                        "'blocks.3.ffn.0.weight', e.g. 'blocks\\.3\\..*')")
    return names


class FullNetwork(nn.Module):
    """The trained parameters of one DiT, with float32 masters; never holds the DiT as a submodule."""

    collective_save = False
    """True under FSDP: ``save_weights`` gathers the shards, so every process calls it."""

    def __init__(self, dit: nn.Module, patterns: list[str], *, save_precision: str = "bf16",
                 comfyui_prefix: bool = True):
        super().__init__()
        self.names = select_parameters(dit, patterns)
        self.save_precision, self.comfyui_prefix = save_precision, comfyui_prefix
        params = dict(dit.named_parameters())
        self._masters: dict[str, nn.Parameter] = {}
        self._copies: set[str] = set()  # names whose master is a float32 copy (the DiT's weight is bf16 / fp16)
        for name in self.names:
            p = params[name]
            if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise UserError(f"full fine-tuning cannot train the fp8 weight {name}: remove dit_weight_dtype / fp8_base")
            if p.dtype == torch.float32:
                self._masters[name] = p
            else:
                self._masters[name] = nn.Parameter(p.detach().float().clone())
                self._copies.add(name)
        self.multiplier = 1.0
        self._dit: list[nn.Module] = []  # the applied DiT (a list, so it is not a submodule)
        self._handles: list[Any] = []
        self._dirty = True  # the masters changed since the DiT's weights were refreshed
        self._engine: Any = None  # the FSDP engine once the DiT is sharded (``shard_with``)
        count = sum(params[n].numel() for n in self.names)
        logger.info("full fine-tuning: %d tensors (%.2fM of %.2fM parameters), float32 %s", len(self.names),
                    count / 1e6, sum(p.numel() for p in dit.parameters()) / 1e6,
                    "master copies" if self._copies else "weights")

    # -- applying -----------------------------------------------------------------------------------------
    def apply_to(self, dit: nn.Module) -> None:
        """Freeze everything but the selected parameters; hook the master copies in."""
        if self._dit and self._dit[0] is not dit:
            raise UserError("full fine-tuning trains one DiT; it cannot be shared between two models")
        dit.requires_grad_(False)
        params = dict(dit.named_parameters())
        for name, master in self._masters.items():
            p = params[name]
            p.requires_grad_(True)
            if name in self._copies:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(master)))
        self._handles.append(dit.register_forward_pre_hook(lambda module, args: self.sync()))
        self._dit = [dit]
        self._dirty = True

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refresh the DiT's weights from the masters after each step of ``optimizer`` (at the next forward)."""
        optimizer.register_step_post_hook(lambda *args: self._mark_dirty())

    def _mark_dirty(self) -> None:
        self._dirty = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._dit:
            self._dit[0].requires_grad_(False)

    @staticmethod
    def _grad_hook(master: nn.Parameter):
        def accumulate(p: torch.Tensor) -> None:
            grad = p.grad.float()
            master.grad = grad if master.grad is None else master.grad + grad
            p.grad = None

        return accumulate

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the float32 masters into the DiT's bf16 / fp16 weights (rounded to nearest) if they changed."""
        if not self._dit or not self._dirty:
            return
        params = dict(self._dit[0].named_parameters())
        for name in self._copies:
            params[name].copy_(self._masters[name].to(params[name].device))
        self._dirty = False

    def shard_with(self, engine: Any) -> None:
        """The DiT is sharded by ``engine`` (``core.fsdp``): the masters are its float32 shards; saving gathers."""
        if self._copies:
            raise RuntimeError("an FSDP-sharded DiT trains float32 shards; it has no master copies")
        self._engine = engine
        self.collective_save = True

    def set_multiplier(self, multiplier: float) -> None:
        if float(multiplier) != 1.0:
            raise UserError("a full fine-tune has no multiplier (it is the model itself); use 1.0")

    # -- training -----------------------------------------------------------------------------------------
    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        return [{"params": list(self._masters.values()), "lr": lr}]

    def parameters(self, recurse: bool = True):  # the masters, so .to() / broadcast / counting see them
        return iter(self._masters.values())

    def _apply(self, fn, recurse: bool = True):
        with torch.no_grad():
            for name in self._copies:  # a float32 weight of the DiT itself moves with the DiT
                self._masters[name].data = fn(self._masters[name].data)
        self._dirty = True
        return self

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {name: master.detach() for name, master in self._masters.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = [n for n in self._masters if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self._masters]
        if strict and (missing or unexpected):
            raise UserError(f"full fine-tune state: {len(missing)} missing and {len(unexpected)} unexpected "
                            f"tensors (e.g. {(missing or unexpected)[0]!r}); trainable_blocks must be the same")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in self._masters:
                    self._masters[name].copy_(value.to(self._masters[name].device))
        self._dirty = True

    # -- saving -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """The DiT's state dict with the trained weights at float32 precision (from the masters); under FSDP the
        gathered state on the main process (an empty dict on the others), which every process must call."""
        if not self._dit:
            raise RuntimeError("the network has not been applied to a DiT")
        if self._engine is not None:  # FSDP: gathered on the main process's CPU (a collective)
            return self._engine.gather_full_state()
        state = {k: v.detach() for k, v in self._dit[0].state_dict().items()}
        state.update(self.state_dict())
        return state

    def save_weights(self, path: str | Path, metadata: dict[str, str], precision: str | None = None) -> None:
        """Write the fine-tuned DiT (original layout; ``full_save_precision``, prefix as configured). Under FSDP
        every process calls it and the main process writes."""
        from ..models.wan.convert import save_dit_state

        state = self.full_state()
        if self._engine is not None and not self._engine.accelerator.is_main_process:
            return

        metadata = dict(metadata)
        if "modelspec.architecture" in metadata:  # a whole model, not an adapter: "wan2.1", "wan2.2"
            metadata["modelspec.architecture"] = metadata["modelspec.architecture"].removesuffix("/lora")
        save_dit_state(state, path, self.save_precision, self.comfyui_prefix, metadata)
