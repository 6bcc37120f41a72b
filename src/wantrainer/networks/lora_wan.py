"""LoRA for the Wan DiT (``network_module = "networks.lora_wan"``).

Each targeted ``nn.Linear`` (by default every Linear of the blocks: self-attn and cross-attn
q/k/v/o, ffn.0, ffn.2, and the image-branch k_img / v_img of Wan 2.1 I2V / FLF2V) gets a low-rank update
``y = W x + multiplier * scale * up(down(x))`` with ``scale = alpha / rank``. The Linear is wrapped by replacing its ``forward`` (the original is kept and
restored by ``remove()``); the LoRA modules are never children of the DiT, so they work with fp8 Linear
subclasses and block swap (the LoRA parameters stay on the compute device while the base weights move).

With ``use_rslora`` the scale is ``alpha / sqrt(rank)``; the saved ``.alpha`` is then
``alpha * sqrt(rank)``, so every loader that computes ``alpha / rank`` applies the same update.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..common.logger import get_logger
from ..errors import UserError
from .adapters import AdapterModule, LoHaModule, LoKrModule, dense_weight
from .args import network_problems, parse_network_args

if TYPE_CHECKING:
    from ..config.training import NetworkConfig

logger = get_logger(__name__)

DEFAULT_TARGET = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.cross_attn\.(k_img|v_img)|blocks\.\d+\.ffn\.(0|2)"
KOHYA_PREFIX = "lora_unet_"


def kohya_name(module_path: str) -> str:
    """``"blocks.0.self_attn.q"`` -> ``"lora_unet_blocks_0_self_attn_q"``."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


class LoRAModule(AdapterModule):
    """The low-rank pair for one Linear: ``lora_down`` [rank, in], ``lora_up`` [out, rank], ``alpha``."""

    def __init__(
        self,
        lora_name: str,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(lora_name, alpha, module_dropout=module_dropout)
        self.rank = rank
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        self.scale = float(alpha) / rank
        self.dropout = dropout
        self.rank_dropout = rank_dropout

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha.item()) / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``multiplier * scale * up(down(x))`` with the training-time dropouts."""
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        scale = self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand((lx.shape[0], self.rank), device=lx.device) > self.rank_dropout
            lx = lx * keep.view(lx.shape[0], *([1] * (lx.dim() - 2)), self.rank).to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * (self.multiplier * scale)

    def scaled_delta(self) -> torch.Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``multiplier * scale * up @ down`` (fp32), the update merged into the base weight."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        return (up @ down) * (self.multiplier * self.scale)


class LoRANetwork(nn.Module):
    """All LoRA modules of one DiT; ``state_dict()`` uses kohya keys (``lora_unet_...``)."""

    collective_save = False
    """The main process alone writes a LoRA file (every process holds the whole network)."""

    def __init__(
        self,
        dit: nn.Module,
        *,
        rank: int,
        alpha: float,
        multiplier: float = 1.0,
        use_rslora: bool = False,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        loraplus_lr_ratio: float | None = None,
        include_patterns: list[str] | None = None,
        exclude_patterns: list[str] | None = None,
        verbose: bool = False,
        algo: str = "lora",
        dora_wd: bool = False,
        factor: int = -1,
        full_matrix: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.rank, self.use_rslora, self.loraplus_lr_ratio = rank, use_rslora, loraplus_lr_ratio
        self.algo, self.dora_wd = algo, dora_wd
        self.saved_alpha = alpha * math.sqrt(rank) if use_rslora else alpha
        self.module_paths = select_targets(dit, include_patterns or [], exclude_patterns or [])
        self.lora_modules: list[AdapterModule] = []
        for path in self.module_paths:
            base = dit.get_submodule(path)
            name, sizes = kohya_name(path), (base.in_features, base.out_features, rank, self.saved_alpha)
            if algo == "loha":
                module = LoHaModule(name, *sizes, module_dropout=module_dropout, generator=generator)
            elif algo == "lokr":
                module = LoKrModule(name, *sizes, factor=factor, full_matrix=full_matrix,
                                    module_dropout=module_dropout, generator=generator)
            else:
                module = LoRAModule(name, *sizes, dropout=dropout, rank_dropout=rank_dropout,
                                    module_dropout=module_dropout, generator=generator)
            if dora_wd:
                module.enable_dora(dense_weight(base))
            self.add_module(module.lora_name, module)
            self.lora_modules.append(module)
        self.set_multiplier(multiplier)
        if verbose:
            for path in self.module_paths:
                logger.info("%s target: %s", algo, path)
        logger.info("%s%s: %d modules, rank %d, alpha %g", {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[algo],
                    " + DoRA" if dora_wd else "", len(self.lora_modules), rank, self.saved_alpha)

    @classmethod
    def from_modules(cls, modules: dict[str, AdapterModule], multiplier: float = 1.0) -> LoRANetwork:
        """A network of ready modules (module path -> module), e.g. read from a file by ``from_state_dict``."""
        network = cls.__new__(cls)
        nn.Module.__init__(network)
        network.rank, network.use_rslora, network.loraplus_lr_ratio = None, False, None
        network.algo = "mixed"
        network.dora_wd = any(m.dora_scale is not None for m in modules.values())
        network.module_paths = list(modules)
        network.lora_modules = []
        for module in modules.values():
            network.add_module(module.lora_name, module)
            network.lora_modules.append(module)
        network.set_multiplier(multiplier)
        return network

    @classmethod
    def from_state_dict(cls, dit: nn.Module, sd: dict[str, torch.Tensor], multiplier: float = 1.0,
                        source: str = "LoRA file") -> LoRANetwork:
        """The network a kohya state dict describes (LoRA, LoHa, LoKr, with or without DoRA) for ``dit``."""
        from .adapters import module_from_tensors
        from .formats import module_tensors

        by_kohya = {kohya_name(name): name for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
        tensors = module_tensors(sd)
        if not tensors:
            raise UserError(f"{source}: no adapter weights (lora_down / hada_* / lokr_* tensors) found")
        unknown = sorted(name for name in tensors if name not in by_kohya)
        if unknown:
            raise UserError(f"{source}: {len(unknown)} adapter module(s) do not exist in this DiT, e.g. "
                            f"{unknown[0]!r}; was it made for this model?")
        modules = {}
        for name in sorted(tensors, key=lambda n: list(by_kohya).index(n)):
            base = dit.get_submodule(by_kohya[name])
            modules[by_kohya[name]] = module_from_tensors(name, tensors[name], base.in_features, base.out_features)
        return cls.from_modules(modules, multiplier)

    # -- applying ---------------------------------------------------------------------------------

    def apply_to(self, dit: nn.Module) -> None:
        """Freeze ``dit`` and wrap its target Linears (may be called for several DiTs sharing one LoRA)."""
        dit.requires_grad_(False)
        for path, module in zip(self.module_paths, self.lora_modules):
            module.wrap(dit.get_submodule(path))

    def remove(self) -> None:
        """Restore the original ``forward`` of every wrapped Linear."""
        for module in self.lora_modules:
            module.unwrap()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for module in self.lora_modules:
            module.multiplier = self.multiplier

    @contextlib.contextmanager
    def network_disabled(self) -> Iterator[None]:
        """The adapter off inside the block (multiplier 0: every wrapped Linear runs only its original forward, so
        the DiT computes exactly its base prediction); the multiplier is restored after."""
        saved = self.multiplier
        self.set_multiplier(0.0)
        try:
            yield
        finally:
            self.set_multiplier(saved)

    @torch.no_grad()
    def merge_to(self, dit: nn.Module) -> None:
        """Add ``multiplier * scale * up @ down`` into the base weights of ``dit`` and unwrap it."""
        self.remove()
        for path, module in zip(self.module_paths, self.lora_modules):
            weight = dit.get_submodule(path).weight
            if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise UserError(f"cannot merge a LoRA into the fp8 weight of {path}; load the DiT in bf16/fp32")
            merged = module.merged_weight(dense_weight(dit.get_submodule(path)))
            weight.copy_(merged.to(weight.dtype))

    # -- training ---------------------------------------------------------------------------------

    def prepare_optimizer_params(self, lr: float) -> list[dict]:
        """Param groups at ``lr`` (LoRA: every down, then every up, then DoRA magnitudes); with LoRA+ the up
        weights at lr * ratio."""
        if self.algo != "lora":
            return [{"params": [p for m in self.lora_modules for p in m.optimizer_params()], "lr": lr}]
        down = [m.lora_down.weight for m in self.lora_modules]
        up = [m.lora_up.weight for m in self.lora_modules]
        magnitudes = [m.dora_scale for m in self.lora_modules if m.dora_scale is not None]
        if not self.loraplus_lr_ratio:
            return [{"params": down + up + magnitudes, "lr": lr}]
        return [{"params": down + magnitudes, "lr": lr}, {"params": up, "lr": lr * self.loraplus_lr_ratio}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to do: the optimiser updates the adapter tensors in place."""

    def save_weights(self, path: str | Path, metadata: dict[str, str], precision: str) -> None:
        """Write the adapter file (kohya keys) in ``precision``."""
        from .formats import save_lora

        save_lora(path, self.state_dict(), metadata, precision)

    def load_weights(self, path: str | Path) -> None:
        """Load an existing LoRA file (any layout ``formats.load_lora`` reads) into this network."""
        from .formats import load_lora

        sd, _ = load_lora(path)
        own = self.state_dict()
        unknown = sorted(k for k in sd if k not in own)
        if unknown:
            raise UserError(
                f"{path}: {len(unknown)} key(s) do not match this network, e.g. {unknown[0]!r}; check the "
                "network_args include/exclude patterns and that the LoRA was made for this model"
            )
        for key, value in sd.items():
            if key.endswith(".alpha"):
                continue
            if tuple(value.shape) != tuple(own[key].shape):
                raise UserError(
                    f"{path}: {key} has shape {list(value.shape)}, this network expects {list(own[key].shape)} "
                    "(network_dim must match the LoRA being continued)"
                )
        missing = [k for k in own if k not in sd and not k.endswith(".alpha")]
        if missing:
            logger.warning("%s has no weights for %d LoRA tensors (e.g. %s); they keep their init", path, len(missing), missing[0])
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
        for module in self.lora_modules:
            module.refresh_scale()
        logger.info("Loaded LoRA weights from %s (%d tensors)", path, len(sd))


def select_targets(dit: nn.Module, include: list[str], exclude: list[str]) -> list[str]:
    """Module paths of the Linears to adapt: default targets, narrowed by include, minus exclude."""
    compiled = {}
    for pattern in [*include, *exclude]:
        try:
            compiled[pattern] = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"network_args: bad regex {pattern!r}: {exc}") from None
    default = re.compile(DEFAULT_TARGET)
    paths = []
    for path, module in dit.named_modules():
        if not isinstance(module, nn.Linear) or not default.fullmatch(path):
            continue
        if include and not any(compiled[p].fullmatch(path) for p in include):
            continue
        if any(compiled[p].fullmatch(path) for p in exclude):
            continue
        paths.append(path)
    if not paths:
        raise UserError(
            "network_args: the include/exclude patterns leave no Linear to train "
            "(patterns must match whole module paths such as 'blocks.3.ffn.0', e.g. 'blocks\\.3\\..*')"
        )
    return paths


def create_network(
    cfg: NetworkConfig, dit: nn.Module, multiplier: float = 1.0, generator: torch.Generator | None = None
) -> nn.Module:
    """Build the LoRA for ``dit`` from the network section; loads ``network_weights`` when it is set."""
    problems = network_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    spec = parse_network_args(cfg.network_module, cfg.network_args)
    if spec.algo == "full":
        from .full import FullNetwork

        return FullNetwork(dit, cfg.trainable_blocks, save_precision=cfg.full_save_precision,
                           comfyui_prefix=cfg.full_save_comfyui_prefix)
    network = LoRANetwork(
        dit,
        rank=cfg.network_dim,
        alpha=cfg.network_alpha,
        multiplier=multiplier,
        use_rslora=cfg.use_rslora,
        dropout=cfg.network_dropout,
        rank_dropout=cfg.rank_dropout,
        module_dropout=cfg.module_dropout,
        loraplus_lr_ratio=cfg.loraplus_lr_ratio,
        include_patterns=spec.include_patterns,
        exclude_patterns=spec.exclude_patterns,
        verbose=spec.verbose,
        algo=spec.algo,
        dora_wd=spec.dora_wd,
        factor=spec.factor,
        full_matrix=spec.full_matrix,
        generator=generator,
    )
    if cfg.network_weights is not None:
        if not Path(cfg.network_weights).is_file():
            raise UserError(f"network_weights: file not found: {cfg.network_weights}")
        network.load_weights(cfg.network_weights)
    return network
