"""Which DiT weights the model holds: one expert (Wan 2.1) or two (Wan 2.2 A14B high / low noise).

Both Wan 2.2 experts have the same architecture, so there is one ``WanModel`` on the compute device and
``Experts.activate(name)`` rebinds its parameters to the chosen expert's tensors (kept on the CPU with
``offload_inactive_dit``, else on the device, where a switch costs nothing). The LoRA network(s) wrap that one
module; with ``dual_lora_mode = "separate"`` activating an expert also swaps which network is applied.

``RegimeSampler`` draws each optimiser step's expert (in proportion to the probability mass the timestep
distribution puts on each side of the boundary) and then timesteps on that side only, so every batch is
trained by a single expert and the overall timestep distribution is the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.logger import get_logger
from ..errors import UserError

logger = get_logger(__name__)

DEFAULT = "default"
HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"
DEFAULT_BOUNDARY = 0.875
I2V_DEFAULT_BOUNDARY = 0.900  # Wan 2.2 I2V A14B (wan/configs/wan_i2v_A14B.py)


@dataclass(frozen=True)
class ExpertPlan:
    """Which checkpoints a run needs: (expert name, file) in load order, and the boundary (0..1)."""

    files: list[tuple[str, Path]]
    boundary: float | None
    t_range: tuple[float, float]


def normalise_boundary(value: float | None, model_type: str = "t2v") -> float:
    """875 or 0.875 -> 0.875; None -> the reference's default for the model type (I2V A14B 0.900, T2V 0.875)."""
    if value is None:
        return I2V_DEFAULT_BOUNDARY if model_type == "i2v_a14b" else DEFAULT_BOUNDARY
    return value / 1000.0 if value > 1 else float(value)


def plan_experts(model_cfg: Any, timestep_cfg: Any) -> ExpertPlan:
    """Decide which expert files to load from ``target_model``, the files given and the timestep range."""
    lo = (timestep_cfg.min_timestep or 0) / 1000.0
    hi = (timestep_cfg.max_timestep if timestep_cfg.max_timestep is not None else 1000) / 1000.0
    from ..models.wan.conditioning import run_model_type

    model_type = run_model_type(model_cfg) if model_cfg.target_model == "wan22" else None
    if model_type == "ti2v":  # the Wan 2.2 TI2V-5B is one model: no experts, no boundary
        wrong = [k for k in ("dit_high_noise", "timestep_boundary") if getattr(model_cfg, k) is not None]
        if wrong:
            raise UserError(f"{' and '.join(f'`{k}`' for k in wrong)}: the TI2V-5B (`dit`) is a single model "
                            "without high / low noise experts; remove them")
    if model_cfg.target_model != "wan22" or model_type == "ti2v":
        if model_cfg.dit is None:
            raise UserError("`dit` is not set: give the path of the Wan DiT checkpoint (.safetensors)")
        return ExpertPlan([(DEFAULT, model_cfg.dit)], None, (lo, hi))

    boundary = normalise_boundary(model_cfg.timestep_boundary, model_type)
    if not 0 < boundary < 1:
        raise UserError(f"`timestep_boundary` = {model_cfg.timestep_boundary}: use a value in (0, 1000)")
    needs_high, needs_low = hi > boundary, lo < boundary
    files: list[tuple[str, Path]] = []
    rng_text = f"the timestep range {lo * 1000:g}..{hi * 1000:g} (min_timestep / max_timestep)"
    if needs_low:
        if model_cfg.dit is None:
            raise UserError(
                f"{rng_text} reaches below timestep_boundary ({boundary * 1000:g}): set `dit` to the "
                "low-noise expert, or raise `min_timestep` to train the high-noise expert only"
            )
        files.append((LOW_NOISE, model_cfg.dit))
    if needs_high:
        if model_cfg.dit_high_noise is None:
            raise UserError(
                f"{rng_text} reaches above timestep_boundary ({boundary * 1000:g}): set `dit_high_noise` to "
                "the high-noise expert, or set `max_timestep` <= the boundary to train the low-noise expert only"
            )
        files.insert(0, (HIGH_NOISE, model_cfg.dit_high_noise))
    unused = [k for k, need in (("dit", needs_low), ("dit_high_noise", needs_high)) if not need]
    for key in unused:
        if getattr(model_cfg, key) is not None:
            logger.info("`%s` is not used: the timestep range stays on the other side of the boundary", key)
    return ExpertPlan(files, boundary, (lo, hi))


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = {name: p.data for name, p in model.named_parameters()}
    tensors.update({name: b.data for name, b in model.named_buffers()})
    return tensors


class Experts:
    """The model plus the weights of every expert; ``activate`` puts one expert's weights (and LoRA) in place."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        boundary: float | None,
        stores: dict[str, dict[str, torch.Tensor]] | None = None,
    ):
        self.model = model
        self.names = list(names)
        self.boundary = boundary
        """Switch point in 0..1: t >= boundary is the high-noise expert (None for Wan 2.1)."""
        self._stores = stores or {}
        self._weights_of = self.names[0]
        self.active = self.names[0]
        self._networks: dict[str, Any] = {}
        self._applied: Any = None

    @property
    def is_dual(self) -> bool:
        return len(self.names) > 1

    def expert_for_t(self, t: float | torch.Tensor) -> str:
        """The expert that handles timestep ``t`` (0..1, or 0..1000 when above 1)."""
        value = float(t)
        value = value / 1000.0 if value > 1 else value
        if self.boundary is None or len(self.names) == 1:
            return self.names[0]
        return HIGH_NOISE if value >= self.boundary else LOW_NOISE

    def set_networks(self, networks: dict[str, Any]) -> None:
        """Which network each expert trains with (the same object for all = shared)."""
        missing = [n for n in self.names if n not in networks]
        if missing:
            raise ValueError(f"no network for expert(s) {missing}")
        self._networks = dict(networks)
        self._apply(self._networks[self.active])

    def network_for(self, name: str) -> Any:
        return self._networks.get(name)

    def activate(self, name: str) -> None:
        """Put ``name``'s base weights into the model and apply its network."""
        if name not in self.names:
            raise KeyError(f"unknown expert {name!r}; this run has {self.names}")
        if name != self._weights_of:
            self._bind(self._stores[name])
            self._weights_of = name
        if self._networks:
            self._apply(self._networks[name])
        self.active = name

    def _bind(self, store: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for key, tensor in store.items():
                target = params.get(key)
                if target is None:
                    target = buffers[key]
                # The tensor goes where the model keeps this weight now (block swap may keep it on the CPU).
                target.data = tensor.to(target.device, non_blocking=True)

    def _apply(self, network: Any) -> None:
        if network is self._applied:
            return
        if self._applied is not None:
            self._applied.remove()
        network.apply_to(self.model)
        self._applied = network

    def capture_stores(self, offload: bool) -> None:
        """Re-home the weight stores after the model moved: on the CPU (offload) or where the model is."""
        params = _named_tensors(self.model)
        for store in self._stores.values():
            for key, tensor in store.items():
                dest = torch.device("cpu") if offload else params[key].device
                store[key] = tensor.to(dest)
        if self._weights_of in self._stores and not offload:
            # The active expert's store is the model's own tensors (no second device copy).
            self._stores[self._weights_of] = params

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active}


def load_experts(
    model_cfg: Any, plan: ExpertPlan, dtype: torch.dtype | None, device: torch.device | str = "cpu"
) -> Experts:
    """Load the planned expert(s); the first becomes the model, the others weight stores (on the CPU).

    A single expert without block swap loads straight onto ``device``; otherwise everything loads on the CPU
    and the caller places the model.
    """
    from ..models.wan.loading import load_wan_dit

    direct = len(plan.files) == 1 and not model_cfg.blocks_to_swap
    if torch.device(device).type == "cpu":
        device = "cpu"  # accelerate may name it "cpu:0", which safetensors rejects

    def load(path: Path, target: torch.device | str = "cpu") -> torch.nn.Module:
        if not Path(path).exists():
            raise UserError(f"DiT checkpoint not found: {path}")
        return load_wan_dit(
            path,
            device=target,
            dtype=dtype,
            weight_dtype=model_cfg.weight_dtype,
            attn_mode=model_cfg.attn_mode,
        )

    names = [name for name, _ in plan.files]
    first_name, first_path = plan.files[0]
    model = load(first_path, device if direct else "cpu")
    stores: dict[str, dict[str, torch.Tensor]] = {}
    if len(plan.files) > 1:
        stores[first_name] = _named_tensors(model)
        for name, path in plan.files[1:]:
            other = load(path)
            if other.config != model.config:
                raise UserError(
                    f"the Wan 2.2 experts differ in architecture: {first_path} vs {path}; "
                    "`dit` and `dit_high_noise` must be the two experts of the same model"
                )
            stores[name] = _named_tensors(other)
            del other
        logger.info("loaded Wan 2.2 experts %s (boundary t = %.3f)", names, plan.boundary)
    return Experts(model, names, plan.boundary, stores)


class RegimeSampler:
    """Per step: draw the expert, then timesteps on its side of the boundary (conditional sampling)."""

    def __init__(
        self,
        sampler: Any,
        names: list[str],
        boundary: float | None,
        mass_samples: int = 200_000,
        seq_len: int | None = None,
    ):
        """``seq_len``: tokens per latent frame of a typical batch, for the resolution-dependent samplers
        (flux_shift, qinglong) when measuring the timestep mass on each side of the boundary."""
        self.sampler = sampler
        self.names = list(names)
        self.boundary = boundary
        self.p_high = 0.0
        if len(self.names) > 1:
            probe = torch.Generator().manual_seed(0)
            t = sampler.sample(mass_samples, probe, "cpu", seq_len=seq_len)
            self.p_high = float((t >= boundary).float().mean())
            logger.info(
                "timestep mass above the boundary: %.3f -> high-noise expert on about %.0f%% of the steps",
                self.p_high,
                100 * self.p_high,
            )

    def share(self, name: str) -> float:
        """Expected fraction of the steps that train ``name``."""
        if len(self.names) == 1:
            return 1.0
        return self.p_high if name == HIGH_NOISE else 1.0 - self.p_high

    def choose(self, generator: torch.Generator) -> str:
        if len(self.names) == 1:
            return self.names[0]
        u = float(torch.rand(1, generator=generator))
        return HIGH_NOISE if u < self.p_high else LOW_NOISE

    def sample(self, name: str, n: int, generator: torch.Generator, seq_len: int | None = None) -> torch.Tensor:
        """``n`` timesteps in (0, 1) for expert ``name`` (float32, CPU)."""
        if len(self.names) == 1:
            return self.sampler.sample(n, generator, "cpu", seq_len=seq_len).float()
        high = name == HIGH_NOISE
        kept: list[torch.Tensor] = []
        count = 0
        for _ in range(10_000):
            t = self.sampler.sample(max(64, 4 * n), generator, "cpu", seq_len=seq_len).float()
            keep = t[t >= self.boundary] if high else t[t < self.boundary]
            kept.append(keep)
            count += keep.numel()
            if count >= n:
                return torch.cat(kept)[:n]
        side = "above" if high else "below"
        raise UserError(
            f"the timestep distribution puts almost no mass {side} timestep_boundary; "
            "change timestep_sampling or the min/max_timestep range"
        )
