"""Shared by the parity tests: diffusers' WanTransformer3DModel on the weights of our DiT, and its inputs."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel

TINY = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)


def diffusers_twin(ours: WanModel) -> WanTransformer3DModel:
    """diffusers' model with the same config as ``ours`` and its (base) weights, converted by diffusers itself."""
    c = ours.config
    ref = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=c.eps, image_dim=c.image_dim, added_kv_proj_dim=c.dim if c.image_dim else None,
        pos_embed_seq_len=c.image_pos_len,
    ).eval()  # fmt: skip
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in ours.state_dict().items()})
    if "img_emb.emb_pos" in converted:  # diffusers' converter leaves the FLF2V position embedding unrenamed
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    ref.load_state_dict(converted, strict=True)
    return ref


def padded_context(context: list[torch.Tensor], text_len: int = 512) -> torch.Tensor:
    """Our variable-length context as diffusers' zero-padded [B, text_len, D] batch."""
    out = torch.zeros(len(context), text_len, context[0].shape[-1])
    for i, c in enumerate(context):
        out[i, : c.shape[0]] = c
    return out


def random_inputs(seed: int, latent_shape: tuple[int, ...], timesteps: list[float], context_lengths: list[int],
                  text_dim: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x, t, context): latents then one context per length, drawn in that order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*latent_shape, generator=gen)
    context = [torch.randn(n, text_dim, generator=gen) for n in context_lengths]
    return x, torch.tensor(timesteps), context


@torch.no_grad()
def twin_output(ref: WanTransformer3DModel, x: torch.Tensor, t: torch.Tensor, context: list[torch.Tensor]
                ) -> torch.Tensor:
    return ref(x, t, padded_context(context), return_dict=False)[0]
