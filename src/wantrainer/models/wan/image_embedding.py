"""The CLIP image branch of the Wan 2.1 I2V / FLF2V DiT: ``img_emb`` projects CLIP vision features to context tokens.

Keys (Wan reference ``MLPProj``): ``img_emb.proj.0`` LayerNorm(1280), ``img_emb.proj.1`` Linear(1280, 1280), GELU,
``img_emb.proj.3`` Linear(1280, dim), ``img_emb.proj.4`` LayerNorm(dim); FLF2V adds ``img_emb.emb_pos``
[1, 514, 1280], a learned position embedding over the two frames' 2 x 257 tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _LayerNormF32(nn.LayerNorm):
    """An affine LayerNorm computed in float32, returning float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class WanImageEmbedding(nn.Module):
    """CLIP features [B, N, image_dim] (or [B, frames, N, image_dim]) -> image context tokens [B, tokens, dim]."""

    def __init__(self, image_dim: int, dim: int, pos_len: int | None = None):
        super().__init__()
        self.proj = nn.Sequential(
            _LayerNormF32(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(), nn.Linear(image_dim, dim),
            _LayerNormF32(dim),
        )  # fmt: skip
        if pos_len is not None:
            self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, image_dim))
        else:
            self.emb_pos = None

    def forward(self, clip_features: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        feats = clip_features.flatten(1, -2) if clip_features.ndim == 4 else clip_features  # [B, tokens, 1280]
        if feats.ndim != 3 or feats.shape[-1] != self.proj[1].in_features:
            raise ValueError(
                f"CLIP features of shape {tuple(clip_features.shape)}; expected [B, tokens, "
                f"{self.proj[1].in_features}]"
            )
        if self.emb_pos is not None:
            if feats.shape[1] != self.emb_pos.shape[1]:
                raise ValueError(
                    f"FLF2V takes the CLIP features of the first and last frame ({self.emb_pos.shape[1]} tokens), "
                    f"got {feats.shape[1]}"
                )
            feats = feats.float() + self.emb_pos.float()
        h = self.proj[0](feats).to(compute_dtype)
        h = self.proj[3](self.proj[2](self.proj[1](h)))
        return self.proj[4](h).to(compute_dtype)  # [B, tokens, dim]
