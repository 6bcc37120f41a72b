"""The Wan 2.1 / 2.2 diffusion transformer (T2V, I2V, FLF2V, TI2V-5B), in the original checkpoint key layout.

Keys: ``patch_embedding``, ``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``time_projection.1``,
``blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}``, ``blocks.N.norm3``, ``blocks.N.ffn.{0,2}``,
``blocks.N.modulation``, ``head.head``, ``head.modulation``; the Wan 2.1 I2V / FLF2V image branch adds
``img_emb.*`` (see ``image_embedding.py``) and ``blocks.N.cross_attn.{k_img,v_img,norm_k_img}``.

The variant is data (``WanModelConfig.model_type``): I2V models take the conditioning ``y`` (mask + image
latents) concatenated to the noisy latents on the channel axis, Wan 2.1 I2V / FLF2V also the CLIP features
(their tokens come first in the cross-attention context), TI2V-5B a per-token timestep.

Numerics follow the Wan reference: the residual stream, time embedding, modulation, norms and RoPE are float32;
Linear layers, patch embedding and attention run in the compute dtype (``model.dtype``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import ATTN_MODES, attention, check_attn_mode
from .configs import WanModelConfig
from .image_embedding import WanImageEmbedding
from .rope import apply_rope, rope_cos_sin
from .token_routing import RoutedSpan, TokenRoute


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32; returns the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and returning float32 (the residual stream is float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attn_mode = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, L, dim] -> q, k, v: [B, L, heads, head_dim]
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, self.attn_mode)
        return self.o(out.flatten(2))  # [B, L, dim]


class WanCrossAttention(WanSelfAttention):
    """Cross-attention to the text; with ``image_branch`` also to the image tokens that precede the text tokens
    in the context (own keys / values ``k_img`` / ``v_img``, outputs summed before ``o``)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, text_len: int = 512,
                 image_branch: bool = False):  # fmt: skip
        super().__init__(dim, num_heads, eps)
        self.text_len = text_len
        if image_branch:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)
        else:
            self.k_img = self.v_img = self.norm_k_img = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # x: [B, L, dim], context: [B, (image tokens +) text_len, dim]
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        image_tokens = context.shape[1] - self.text_len if self.k_img is not None else 0
        text = context[:, image_tokens:]
        k = self.norm_k(self.k(text)).unflatten(-1, (self.num_heads, -1))
        v = self.v(text).unflatten(-1, (self.num_heads, -1))
        out = attention(q, k, v, self.attn_mode).flatten(2)
        if image_tokens:
            image = context[:, :image_tokens]
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, (self.num_heads, -1))
            v_img = self.v_img(image).unflatten(-1, (self.num_heads, -1))
            out = out + attention(q, k_img, v_img, self.attn_mode).flatten(2)
        return self.o(out)


def _modulation_terms(table: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``table`` [1, n, dim] + ``e`` [B, n, dim] or [B, L, n, dim] -> n float32 tensors [B, 1 or L, dim]."""
    if e.ndim == 3:
        e = e.unsqueeze(1)  # [B, 1, n, dim]
    return (table.float().unsqueeze(0) + e.float()).unbind(dim=2)


class WanAttentionBlock(nn.Module):
    def __init__(self, config: WanModelConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, config.num_heads, eps)
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(
            dim, config.num_heads, eps, config.text_len, image_branch=config.image_dim is not None
        )
        self.norm2 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """x: [B, L, dim] float32; e: [B, 6, dim] or [B, L, 6, dim] float32; context: [B, text_len, dim]."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = _modulation_terms(self.modulation, e)
        # 1. self-attention
        y = self.self_attn((self.norm1(x) * (1 + scale_sa) + shift_sa).to(compute_dtype), cos, sin)
        x = x + y.float() * gate_sa
        # 2. cross-attention
        x = x + self.cross_attn(self.norm3(x).to(compute_dtype), context).float()
        # 3. feed-forward
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(compute_dtype))
        return x + y.float() * gate_ff


class WanHead(nn.Module):
    def __init__(self, config: WanModelConfig):
        super().__init__()
        self.norm = LayerNorm32(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        # x: [B, L, dim] float32; e: [B, dim] or [B, L, dim] float32
        shift, scale = _modulation_terms(self.modulation, e.unsqueeze(-2))
        return self.head((self.norm(x) * (1 + scale) + shift).to(compute_dtype))


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] timesteps (0..1000) -> [N, dim] float32 (cos half first), computed in float64 as the reference."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = torch.outer(timesteps.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class WanModel(nn.Module):
    """Wan DiT. ``forward(x [B,C,F,H,W], timestep [B] or [B,L], context list of [L_i, text_dim], clip_fea, y)``."""

    _keep_in_fp32_modules = (
        "time_embedding",
        "time_projection",
        "modulation",
        "norm1",
        "norm2",
        "norm3",
        "norm_q",
        "norm_k",
        "norm_k_img",
    )
    """Name parts of the precision-sensitive parameters kept in float32 by ``to_compute_dtype``."""

    def __init__(self, config: WanModelConfig, attn_mode: str = "sdpa"):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(config) for _ in range(config.num_layers)])
        self.head = WanHead(config)
        if config.image_dim is not None:
            self.img_emb = WanImageEmbedding(config.image_dim, dim, config.image_pos_len)
        else:
            self.img_emb = None
        self.gradient_checkpointing = False
        self.gradient_checkpointing_cpu_offload = False
        self.block_swapper = None  # an offloading.BlockSwapper when blocks_to_swap > 0
        self.upcast_buffers = None  # a stored_linear.UpcastBuffers when block Linears keep another dtype
        self.token_route: TokenRoute | None = None  # TREAD routing of training forward passes (None: off)
        self.attn_mode = "sdpa"
        self.set_attn_mode(attn_mode)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ----- set-up -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, zero_head: bool = False) -> None:
        """Reference initialisation (xavier Linear, zero bias). The head is zeroed only if ``zero_head``: a zero
        head would stop gradients from reaching the blocks of a freshly initialised model."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        if zero_head:
            nn.init.zeros_(self.head.head.weight)

    def set_attn_mode(self, mode: str, for_training: bool = False) -> None:
        """Choose the attention backend of every block (see ``attention.ATTN_MODES``).

        Raises ``UserError`` if the backend is not installed, or cannot train and ``for_training`` is set.
        """
        check_attn_mode(mode, for_training)
        assert mode in ATTN_MODES
        self.attn_mode = mode
        for module in self.modules():
            if isinstance(module, WanSelfAttention):
                module.attn_mode = mode

    def to_compute_dtype(self, dtype: torch.dtype) -> WanModel:
        """Cast floating parameters to ``dtype``, keeping ``_keep_in_fp32_modules`` in float32; fp8 stays fp8 and
        a ``StoredLinear`` weight keeps its storage dtype."""
        from .stored_linear import StoredLinear

        keep = set(self._keep_in_fp32_modules)
        stored = {id(m.weight) for m in self.modules() if isinstance(m, StoredLinear)}
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if not tensor.is_floating_point() or tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                continue
            if id(tensor) in stored:
                continue
            target = torch.float32 if keep & set(name.split(".")) or name.endswith("scale_weight") else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
        return self

    def enable_fp8_matmul(self, enabled: bool = True) -> int:
        """Run the forward matmul of the fp8 block Linears through ``torch._scaled_mm`` (see ``stored_linear``).

        The caller checks the device (``stored_linear.check_fp8_matmul_device``). Returns the number of layers.
        """
        from .stored_linear import FP8_DTYPES, StoredLinear

        layers = [m for m in self.blocks.modules() if isinstance(m, StoredLinear) and m.weight.dtype in FP8_DTYPES]
        for module in layers:
            module.fp8_matmul = enabled
        return len(layers)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the patch embedding, never fp8)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ----- memory features ----------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Recompute each block in backward; with ``cpu_offload`` keep the block inputs on the CPU."""
        self.gradient_checkpointing = True
        self.gradient_checkpointing_cpu_offload = cpu_offload

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.gradient_checkpointing_cpu_offload = False

    def enable_block_swap(self, num_blocks: int, device: torch.device | str) -> None:
        """Keep ``num_blocks`` blocks on the CPU and bring each to ``device`` just ahead of use (0 disables)."""
        from .offloading import BlockSwapper

        if self.block_swapper is not None:
            self.block_swapper.remove()
            self.block_swapper = None
        if num_blocks > 0:
            self.block_swapper = BlockSwapper(self.blocks, num_blocks, torch.device(device))

    def move_to_device_except_swap_blocks(self, device: torch.device | str) -> None:
        """Move everything to ``device`` except the swapped blocks, which go to (or stay on) the CPU."""
        for name, child in self.named_children():
            if name != "blocks":
                child.to(device)
        if self.block_swapper is None:
            self.blocks.to(device)
        else:
            self.block_swapper.prepare_before_forward(force=True)

    def enable_token_routing(self, route: TokenRoute | None) -> None:
        """TREAD: in training forward passes ``route.selection_ratio`` of the tokens skip the blocks
        ``route.start_block .. route.end_block`` (see ``token_routing``); None disables it."""
        if route is not None and not 0 <= route.start_block <= route.end_block < len(self.blocks):
            raise ValueError(f"token route {route} does not fit {len(self.blocks)} blocks")
        self.token_route = route

    def prepare_block_swap_before_forward(self) -> None:
        """Put the swapped blocks back where a forward pass starts (no-op without block swap)."""
        if self.block_swapper is not None:
            self.block_swapper.prepare_before_forward()

    # ----- forward ------------------------------------------------------------------------------------------
    def embed_time(
        self, timestep: torch.Tensor, batch: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] or [B, L] -> e [B, dim] or [B, L, dim] and e0 [B, 6, dim] or [B, L, 6, dim] (float32)."""
        if timestep.ndim == 2 and timestep.shape[1] != seq_len:
            raise ValueError(f"per-token timestep has {timestep.shape[1]} tokens, the latents {seq_len}")
        if timestep.shape[0] != batch or timestep.ndim not in (1, 2):
            raise ValueError(f"timestep shape {tuple(timestep.shape)} does not match batch size {batch}")
        t = timestep.reshape(-1).to(self.device)
        e = self.time_embedding(
            sinusoidal_embedding(t, self.config.freq_dim).to(self.time_embedding[0].weight.dtype)
        )
        e0 = self.time_projection(e).float().unflatten(-1, (6, self.config.dim))  # [B*(L), 6, dim]
        return e.float().reshape(*timestep.shape, -1), e0.reshape(*timestep.shape, 6, -1)

    def embed_text(self, context: list[torch.Tensor] | torch.Tensor, batch: int) -> torch.Tensor:
        """Zero-pad each [L_i, text_dim] to text_len and project: -> [B, text_len, dim] in the compute dtype."""
        if len(context) != batch:
            raise ValueError(f"{len(context)} text contexts for a batch of {batch}")
        text_len, text_dim = self.config.text_len, self.config.text_dim
        padded = torch.zeros(batch, text_len, text_dim, device=self.device, dtype=self.dtype)
        for i, ctx in enumerate(context):
            if ctx.shape[0] > text_len or (ctx.shape[0] and ctx.shape[-1] != text_dim):
                raise ValueError(
                    f"text context {i} has shape {tuple(ctx.shape)}; expected [<= {text_len}, {text_dim}]"
                )
            padded[i, : ctx.shape[0]] = ctx.to(padded)
        return self.text_embedding(padded)

    def embed_image(self, clip_fea: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """CLIP features [B, tokens, image_dim] (I2V / FLF2V) -> image context [B, tokens, dim], else None."""
        if self.img_emb is None:
            if clip_fea is not None:
                raise ValueError(f"CLIP features given to a {self.config.model_type} model, which has no image branch")
            return None
        if clip_fea is None or clip_fea.shape[0] != batch:
            shape = None if clip_fea is None else tuple(clip_fea.shape)
            raise ValueError(f"the {self.config.model_type} model needs CLIP features for a batch of {batch}, got {shape}")
        return self.img_emb(clip_fea.to(self.device), self.dtype)

    def concat_condition(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Noisy latents [B, out_dim, F, H, W] + conditioning y [B, in_dim - out_dim, F, H, W] -> [B, in_dim, ...]."""
        need = self.config.condition_channels
        if need == 0:
            if y is not None:
                raise ValueError(f"image conditioning given to a {self.config.model_type} model, which takes none")
            return x
        if y is None or y.shape[0] != x.shape[0] or y.shape[1] != need or y.shape[2:] != x.shape[2:]:
            shape = None if y is None else tuple(y.shape)
            raise ValueError(
                f"the {self.config.model_type} model needs conditioning y of shape "
                f"[{x.shape[0]}, {need}, {', '.join(map(str, x.shape[2:]))}] (mask + image latents), got {shape}"
            )
        return torch.cat([x, y.to(x)], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: list[torch.Tensor] | torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, out_dim, F, H, W] noisy latents, timestep [B] or [B, L] in 0..1000, ``clip_fea`` [B, tokens, 1280]
        (Wan 2.1 I2V / FLF2V), ``y`` [B, in_dim - out_dim, F, H, W] (I2V / FLF2V: 4 mask + 16 image-latent
        channels) -> prediction [B, out_dim, F, H, W] float32. A T2V / TI2V model takes neither."""
        batch, _, frames, height, width = x.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        x = self.concat_condition(x, y)
        # 1. patchify: [B, C, F, H, W] -> [B, dim, f, h, w] -> [B, L, dim]
        h = self.patch_embedding(x.to(self.device, self.dtype)).flatten(2).transpose(1, 2)
        h = h.float().contiguous()
        # 2. conditions: image tokens (if any) first, then the text tokens
        e, e0 = self.embed_time(timestep, batch, h.shape[1])
        ctx = self.embed_text(context, batch)
        image_ctx = self.embed_image(clip_fea, batch)
        if image_ctx is not None:
            ctx = torch.cat([image_ctx, ctx], dim=1)  # [B, image tokens + text_len, dim]
        cos, sin = rope_cos_sin(grid, self.config.head_dim, h.device)
        # 3. blocks
        h = self._run_blocks(h, e0, ctx, cos, sin)
        # 4. head and unpatchify: [B, L, p_t*p_h*p_w*C] -> [B, C, F, H, W]
        out = self.head(h, e, self.dtype).float()
        out = out.reshape(batch, *grid, p_t, p_h, p_w, -1)  # [B, f, h, w, pt, ph, pw, C]
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, h, ph, w, pw]
        return out.reshape(batch, -1, frames, height, width)

    def _run_blocks(self, h, e0, ctx, cos, sin) -> torch.Tensor:
        swapper = self.block_swapper
        if swapper is not None:
            swapper.prepare_before_forward()
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        offload = use_checkpoint and self.gradient_checkpointing_cpu_offload
        route = self.token_route if self.training and torch.is_grad_enabled() else None
        span: RoutedSpan | None = None
        block_e0, block_cos, block_sin = e0, cos, sin
        device = h.device
        if offload:
            h = h.to("cpu")
        for index, block in enumerate(self.blocks):
            if route is not None and index == route.start_block:  # TREAD: only the kept tokens go on
                span = RoutedSpan(route, h, e0, cos, sin)
                h, block_e0, block_cos, block_sin = span.h, span.e0, span.cos, span.sin
            if swapper is not None:
                h = swapper.before_block(index, h)
            args = (block_e0, ctx, block_cos, block_sin, self.dtype)
            if not use_checkpoint:
                h = block(h, *args)
            elif offload:
                h = checkpoint(_offloaded_block, block, device, h, *args, use_reentrant=False)
            else:
                h = checkpoint(block, h, *args, use_reentrant=False)
            if swapper is not None:
                h = swapper.after_block(index, h)
            if span is not None and index == route.end_block:  # the routed tokens rejoin in their places
                h = span.close(h)
                span, block_e0, block_cos, block_sin = None, e0, cos, sin
        return h.to(device)


def _offloaded_block(block: WanAttentionBlock, device: torch.device, h: torch.Tensor, *args) -> torch.Tensor:
    """Run a block on ``device`` with its input and output on the CPU (what checkpointing then keeps)."""
    return block(h.to(device, non_blocking=True), *args).to("cpu")


__all__ = ["WanModel", "WanAttentionBlock", "WanModelConfig", "sinusoidal_embedding"]
