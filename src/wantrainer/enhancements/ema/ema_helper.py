"""EMA of the trained weights, one per network (Wan 2.2 separate LoRAs: one each).

After every optimiser step that updated a network, at steps that are multiples of ``ema_update_every``:
``ema = d * ema + (1 - d) * w`` in fp32 for each trainable tensor ``w`` of the network, with ``d`` the decay
(``ema_decay``, or from ``ema_half_life_steps``), lowered for the first updates by ``ema_warmup``. Up to
``ema_start_step`` the EMA is a copy of the weights. Every process holds the same EMA (the weights are the same on
every process under DDP). Saved beside each LoRA as ``{name}-ema.safetensors`` (the network's tensors with the
EMA in place of the trained ones, its metadata and format), and in the resume state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...common.logger import get_logger
from ..base import BaseEnhancement, EvaluationVariant, ExtraSave, RunContext, SaveRequest, StepEnd
from ..registry import register
from .config import EmaConfig

logger = get_logger(__name__)


def ema_decay_at(cfg: EmaConfig, updates: int) -> float:
    """The decay of the ``updates``-th update after ``ema_start_step`` (1-based)."""
    decay = cfg.decay
    if cfg.ema_warmup == "linear":
        return min(decay, (1.0 + updates) / (10.0 + updates))
    if cfg.ema_warmup == "power":
        return min(decay, 1.0 - (1.0 + updates) ** -cfg.ema_warmup_power)
    return decay


class NetworkEma:
    """The fp32 EMA of one network's trainable tensors (by their ``state_dict`` names)."""

    def __init__(self, network: Any, device: torch.device):
        self.network = network
        names = {id(p): n for n, p in network.named_parameters()}
        self.params = {names[id(p)]: p for p in network.parameters() if p.requires_grad and id(p) in names}
        self.shadow = {n: p.detach().to(device, torch.float32, copy=True) for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def copy_weights(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].copy_(param.detach().float())

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.mul_(decay).add_(param.detach().to(shadow.device, torch.float32), alpha=1.0 - decay)
        self.updates += 1

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """The network's ``state_dict`` with the EMA in place of the trained tensors."""
        sd = dict(self.network.state_dict())
        sd.update({n: t.detach().cpu() for n, t in self.shadow.items()})
        return sd

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA in the network's parameters inside the block; the trained weights restored exactly after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])


@register("ema")
class EmaHelper(BaseEnhancement):
    save_suffixes = ("-ema",)
    """``enable_ema``: the EMA of every trained network (see the module docstring)."""

    def __init__(self, cfg: EmaConfig):
        self.cfg = cfg
        self.emas: dict[str, NetworkEma] = {}
        self.last_decay = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> EmaHelper | None:
        section: EmaConfig = cfg.ema
        return cls(section) if section.enable_ema else None

    def setup_hooks(self, run: RunContext) -> None:
        device = run.device if self.cfg.ema_device == "device" else torch.device("cpu")
        self.emas = {name: NetworkEma(network, device) for name, network in run.networks.items()}
        count = sum(t.numel() for e in self.emas.values() for t in e.shadow.values())
        logger.info("EMA of %s: %.2fM fp32 values on %s, decay %.6g every %d step(s) from step %d (warm-up %s)",
                    "/".join(self.emas), count / 1e6, device, self.cfg.decay, self.cfg.ema_update_every,
                    self.cfg.ema_start_step, self.cfg.ema_warmup)

    def remove_hooks(self) -> None:
        return None  # nothing was attached to the model

    def on_step_end(self, step: StepEnd) -> None:
        for name in step.updated:
            ema = self.emas.get(name)
            if ema is None:
                continue
            if step.step <= self.cfg.ema_start_step:
                ema.copy_weights()
            elif step.step % self.cfg.ema_update_every == 0:
                self.last_decay = ema_decay_at(self.cfg, ema.updates + 1)
                ema.update(self.last_decay)

    def get_ema_metrics(self) -> dict[str, float]:
        return {"decay": self.last_decay}

    def extra_saves(self, save: SaveRequest) -> list[ExtraSave]:
        ema = self.emas.get(save.network)
        if ema is None:
            return []
        return [ExtraSave("-ema", ema.state_dict_for_save(), {"ss_ema": "true", "ss_ema_decay": f"{self.cfg.decay:g}",
                                                             "ss_ema_updates": str(ema.updates)})]

    def evaluation_variants(self, purpose: str) -> list[EvaluationVariant]:
        wanted = self.cfg.validate_with_ema if purpose == "validation" else self.cfg.sample_with_ema
        return [EvaluationVariant("ema", self._applied)] if wanted and self.emas else []

    @contextlib.contextmanager
    def _applied(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for ema in self.emas.values():
                stack.enter_context(ema.applied())
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"networks": {name: {"shadow": {n: t.detach().cpu() for n, t in e.shadow.items()},
                                    "updates": e.updates} for name, e in self.emas.items()},
                "last_decay": self.last_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("networks", {}).items():
            ema = self.emas.get(name)
            if ema is None:
                continue
            for key, tensor in saved["shadow"].items():
                ema.shadow[key].copy_(tensor)
            ema.updates = int(saved["updates"])
        self.last_decay = float(state.get("last_decay", 0.0))
