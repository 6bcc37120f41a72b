"""REPA (representation alignment, Yu et al. 2024, arXiv:2410.06940) and CREPA (its cross-frame form for video).

Features: ``cache-latents`` stores the frozen encoder's patch features of every item's clean frames
(``encoder.FrameEncoder``) as ``{latent cache stem}_wtrepa.safetensors``, tensor ``repa_features``
[F_latent, gh, gw, D] float16, metadata ``repa_encoder``, ``repa_image_size``, ``latent_shape``: a file made with
another encoder or input size is stale (not trained on, re-encoded by cache-latents).

Training: a forward hook on block ``repa_alignment_depth`` keeps its output hidden states h [B, L, dim] of the
micro-batch's forward pass (the first pass with gradients after ``modify_inputs``; gradient checkpointing's
recomputation in backward and block swap run the same block and are ignored). A projector MLP (trained with the
network, saved in the resume state, never in the LoRA file) maps h on the DiT's token grid [B, f, h, w, dim] to
[B, f, h, w, D]; projected tokens and features are average-pooled to the common grid (the smaller of the two per
axis), and per token

    repa = -repa_loss_lambda * mean_{b, frame, token} cos(proj, feature)

(frames outside the objective's loss mask, such as the clean first frame of a TI2V-5B image-to-video item, do not
count). CREPA adds, for every distance d (``crepa_adjacent_distance``; all of 1..d with
``crepa_cumulative_neighbors``) with weight w_d = exp(-d / crepa_adjacent_tau),

    crepa = -crepa_lambda * mean_b (1 / f) sum_i sum_d w_d [cos(proj_i, feature_{i+d}) + cos(proj_i, feature_{i-d})]

(terms whose neighbour lies outside the clip left out), as Takenoko's CREPA does; an image item (one latent frame)
has no neighbour, so its CREPA term is 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...common.logger import get_logger
from ...errors import UserError
from ..base import BaseEnhancement, ItemCache, PixelCache, RunContext, StepContext
from ..registry import register
from .config import RepaConfig
from .encoder import encoder_signature, load_frame_encoder

logger = get_logger(__name__)

FEATURES = "repa_features"
SUFFIX = "_wtrepa"


class BlockTap:
    """The output of one block from the first forward pass with gradients after ``arm()`` (later calls of the
    block, such as checkpointing's recomputation during backward, are ignored)."""

    def __init__(self, block: nn.Module):
        self.armed = False
        self.captured: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.armed and torch.is_grad_enabled():
            self.captured = output[0] if isinstance(output, (tuple, list)) else output
            self.armed = False

    def arm(self) -> None:
        self.armed, self.captured = True, None

    def take(self) -> torch.Tensor | None:
        captured, self.captured, self.armed = self.captured, None, False
        return captured

    def remove(self) -> None:
        self.handle.remove()
        self.armed, self.captured = False, None


def build_projector(dim: int, hidden: int, out: int, layers: int, seed: int) -> nn.Sequential:
    """An MLP dim -> hidden (-> hidden ...) -> out with SiLU between its ``layers`` linear maps, initialised from
    ``seed`` (the global random state is left as it was)."""
    widths = [dim] + [hidden] * (layers - 1) + [out]
    modules: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, (a, b) in enumerate(zip(widths, widths[1:])):
            if index:
                modules.append(nn.SiLU())
            modules.append(nn.Linear(a, b))
    return nn.Sequential(*modules)


def pool_to(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, f, h, w, D] -> [B, f, grid_h, grid_w, D] by average pooling (identity when the grid is the same)."""
    b, f, h, w, d = tokens.shape
    if (h, w) == tuple(grid):
        return tokens
    x = tokens.permute(0, 1, 4, 2, 3).reshape(b * f, d, h, w)  # [B*f, D, h, w]
    x = F.adaptive_avg_pool2d(x, grid)
    return x.reshape(b, f, d, *grid).permute(0, 1, 3, 4, 2)


def frame_cosines(proj: torch.Tensor, features: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Mean cosine per token of projected frame i with feature frame i + offset: [B, f - |offset|]
    (proj / features normalised [B, f, h, w, D])."""
    f = proj.shape[1]
    if offset >= 0:
        a, b = proj[:, : f - offset], features[:, offset:]
    else:
        a, b = proj[:, -offset:], features[:, : f + offset]
    return (a * b).sum(dim=-1).mean(dim=(2, 3))


def crepa_similarity(proj: torch.Tensor, features: torch.Tensor, distances: list[tuple[int, float]]) -> torch.Tensor:
    """The cross-frame similarity per projected frame [B, f]: sum over (d, w_d) of w_d times the cosine with the
    features d frames ahead and d frames behind (where those exist)."""
    b, f = proj.shape[:2]
    total = proj.new_zeros(b, f)
    for d, weight in distances:
        if d >= f:
            continue
        total = total + F.pad(weight * frame_cosines(proj, features, d), (0, d))  # frames 0 .. f-d-1
        total = total + F.pad(weight * frame_cosines(proj, features, -d), (d, 0))  # frames d .. f-1
    return total


@register("repa")
class RepaHelper(BaseEnhancement):
    """``enable_repa``: REPA (and CREPA with ``crepa_enabled``); see the module docstring."""

    def __init__(self, cfg: RepaConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.projectors: dict[str, nn.Sequential] = {}
        """Network name -> its projector: one per trained network ("default", or one per separate Wan 2.2 expert
        LoRA, whose hidden states differ), trained by that network's optimiser."""
        self._network_of: dict[str, str] = {}  # expert -> the name of the network it trains
        self.tap: BlockTap | None = None
        self.model: nn.Module | None = None
        self._cos_sum = 0.0
        self._cos_count = 0
        self.last_cosine = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> RepaHelper | None:
        section: RepaConfig = cfg.repa
        return cls(section, cfg.training.seed) if section.enable_repa else None

    # ----- caches ------------------------------------------------------------------------------------------------
    def pixel_cache(self) -> PixelCache:
        name, size = self.cfg.repa_encoder_name, self.cfg.repa_encoder_image_size
        return PixelCache(FEATURES, SUFFIX, FEATURES, encoder_signature(name, size), load_frame_encoder(name, size))

    def pixel_caches(self) -> list[PixelCache]:
        return [self.pixel_cache()]

    def item_caches(self) -> list[ItemCache]:
        return [self.pixel_cache().item_cache(missing="skip", stack=False)]

    # ----- setup / teardown --------------------------------------------------------------------------------------
    def setup_hooks(self, run: RunContext) -> None:
        model = run.model
        blocks = model.blocks
        depth = self.cfg.repa_alignment_depth
        if depth >= len(blocks):
            raise UserError(f"`repa_alignment_depth` = {depth}: this DiT has {len(blocks)} blocks (0 .. "
                            f"{len(blocks) - 1}); pick a block about a third of the way in")
        width = self._feature_width(run)
        networks = dict(run.networks) or {"default": None}
        self.projectors = {
            name: build_projector(model.config.dim, self.cfg.repa_projector_hidden_dim, width,
                                  self.cfg.repa_projector_layers, self.seed + 7331 + index).to(run.device)
            for index, name in enumerate(networks)
        }
        first = next(iter(networks))
        self._network_of = {}
        for expert in getattr(run.experts, "names", []):
            network = run.experts.network_for(expert)
            self._network_of[expert] = next((n for n, net in networks.items() if net is network), first)
        self.model = model
        self.tap = BlockTap(blocks[depth])
        count = sum(p.numel() for projector in self.projectors.values() for p in projector.parameters())
        logger.info("REPA: block %d of %d aligned with %s features (width %d), %s %.2fM parameters%s", depth,
                    len(blocks), self.cfg.repa_encoder_name, width,
                    "projector" if len(self.projectors) == 1 else f"{len(self.projectors)} projectors (one per "
                    "network)", count / 1e6, ", CREPA on" if self.cfg.crepa_enabled else "")

    @property
    def projector(self) -> nn.Sequential | None:
        """The first network's projector (the only one unless separate Wan 2.2 expert LoRAs train)."""
        return next(iter(self.projectors.values()), None)

    def projector_for(self, expert: str) -> nn.Sequential:
        return self.projectors.get(self._network_of.get(expert, ""), self.projector)

    @staticmethod
    def _feature_width(run: RunContext) -> int:
        from safetensors import safe_open

        for item in getattr(run.loader, "items", []):
            path = dict(item.extra_paths).get(FEATURES)
            if path is not None:
                with safe_open(str(path), framework="pt") as f:
                    return int(f.get_slice(FEATURES).get_shape()[-1])
        raise UserError("REPA: no training item has encoder features; run `wantrainer cache-latents --config <your "
                        "config>` with enable_repa = true")

    def remove_hooks(self) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def trainable_params(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(projector.parameters()) for name, projector in self.projectors.items()}

    # ----- the step ----------------------------------------------------------------------------------------------
    def modify_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.tap is not None:
            self.tap.arm()
        return batch

    def loss(self, ctx: StepContext) -> tuple[torch.Tensor | None, dict[str, float]]:
        hidden = self.tap.take() if self.tap is not None else None
        features = ctx.item_extra(FEATURES)
        if hidden is None or features is None or self.projector is None:
            return None, {}
        proj, target = self._aligned(ctx, hidden, features)
        weights = self._frame_weights(ctx, proj.shape[:2])
        cos = frame_cosines(proj, target)  # [B, f]
        cosine = (cos * weights).sum() / weights.sum().clamp_min(1e-12)
        loss = -self.cfg.repa_loss_lambda * cosine
        metrics = {"repa/loss": float(loss.detach())}
        self._cos_sum += float(cosine.detach())
        self._cos_count += 1
        if self.cfg.crepa_enabled:
            cross = crepa_similarity(proj, target, self._distances())  # [B, f]
            per_item = (cross * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)
            crepa = -self.cfg.crepa_lambda * per_item.mean()
            loss = loss + crepa
            metrics["crepa/loss"] = float(crepa.detach())
        return loss, metrics

    def _aligned(self, ctx: StepContext, hidden: torch.Tensor, features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised projected tokens and features on their common grid, both [B, f, gh, gw, D]."""
        if isinstance(features, (list, tuple)):
            features = torch.stack([f.to(hidden.device) for f in features])
        b, _, frames, height, width = ctx.latents.shape
        p_t, p_h, p_w = self.model.config.patch_size
        f, h, w = frames // p_t, height // p_h, width // p_w
        if features.shape[1] != f:
            raise RuntimeError(f"REPA features hold {features.shape[1]} latent frames, the latents {f}")
        tokens = hidden.float().reshape(b, f, h, w, -1)  # [B, L, dim] -> [B, f, h, w, dim]
        projector = self.projector_for(ctx.expert)
        proj = projector(tokens.to(next(projector.parameters()).device))  # [B, f, h, w, D]
        grid = (min(h, features.shape[2]), min(w, features.shape[3]))
        proj = F.normalize(pool_to(proj, grid), dim=-1)
        target = F.normalize(pool_to(features.to(proj.device, torch.float32), grid), dim=-1)
        return proj, target

    @staticmethod
    def _frame_weights(ctx: StepContext, shape: torch.Size) -> torch.Tensor:
        """1 for each latent frame the objective trains on ([B, f]); 0 on frames outside its loss mask."""
        mask = ctx.get("loss_mask")
        if mask is None:
            return torch.ones(shape, device=ctx.latents.device)
        return mask.reshape(mask.shape[0], -1)[:, : shape[1]].to(torch.float32).expand(shape)

    def _distances(self) -> list[tuple[int, float]]:
        top = self.cfg.crepa_adjacent_distance
        ds = range(1, top + 1) if self.cfg.crepa_cumulative_neighbors else [top]
        return [(d, math.exp(-d / self.cfg.crepa_adjacent_tau)) for d in ds]

    def get_repa_metrics(self) -> dict[str, float]:
        if self._cos_count:
            self.last_cosine = self._cos_sum / self._cos_count
            self._cos_sum, self._cos_count = 0.0, 0
        return {"cosine": self.last_cosine}

    # ----- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.projectors:
            return {}
        return {"projectors": {name: {k: v.detach().cpu().clone() for k, v in projector.state_dict().items()}
                               for name, projector in self.projectors.items()},
                "last_cosine": self.last_cosine}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("projectors")
        if saved is None and "projector" in state:  # a state with one projector
            saved = {next(iter(self.projectors), "default"): state["projector"]}
        if self.projectors and saved is not None:
            if sorted(saved) != sorted(self.projectors):
                raise UserError(f"`resume`: the saved state has REPA projectors for the network(s) {sorted(saved)}, "
                                f"this run trains {sorted(self.projectors)}; resume with the dual_lora_mode of the run "
                                "that saved it")
            for name, projector in self.projectors.items():
                try:
                    projector.load_state_dict(saved[name])
                except RuntimeError as exc:
                    raise UserError(f"`resume`: the saved REPA projector does not fit this config "
                                    f"({str(exc).splitlines()[0]}); repa_projector_hidden_dim / repa_projector_layers "
                                    "/ repa_encoder_name must be those of the run that saved it") from None
        self.last_cosine = float(state.get("last_cosine", 0.0))
