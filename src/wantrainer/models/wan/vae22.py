"""The Wan 2.2 VAE (TI2V-5B): original checkpoint layout -> diffusers ``AutoencoderKLWan`` configured as 2.2.

The Wan 2.2 VAE (``Wan2.2_VAE.pth``, ComfyUI's ``wan2.2_vae.safetensors``) compresses 4x in time and 16x in
space into 48 channels: the pixels are patchified 2 x 2 (3 -> 12 channels) before a residual encoder
(``Down_ResidualBlock`` / ``Up_ResidualBlock`` with parameter-free average / duplicate shortcuts), base width 160,
decoder width 256. diffusers holds it as ``AutoencoderKLWan(is_residual=True, patch_size=2, ...)``.

Original keys (``wan/modules/vae2_2.py``): ``encoder.conv1``, ``encoder.downsamples.I.downsamples.J`` (J < 2: a
``ResidualBlock`` ``residual.{0,2,3,6}`` / ``shortcut``; J = 2: the ``Resample`` ``resample.1`` / ``time_conv``),
``encoder.middle.{0,1,2}``, ``encoder.head.{0,2}``, ``conv1`` / ``conv2``, ``decoder.conv1``, ``decoder.middle``,
``decoder.upsamples.I.upsamples.J`` (J < 3 residual blocks, J = 3 the resample), ``decoder.head.{0,2}``.
"""

from __future__ import annotations

import re

import torch

LATENT_CHANNELS = 48
SPATIAL_STRIDE = 16
PATCH = 2

LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip
"""Wan 2.2's per-channel latent statistics (``Wan2_2_VAE``): latents are ``(mu - mean) / std``."""

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}  # fmt: skip
_FIXED = {
    "encoder.conv1.weight": "encoder.conv_in.weight", "encoder.conv1.bias": "encoder.conv_in.bias",
    "decoder.conv1.weight": "decoder.conv_in.weight", "decoder.conv1.bias": "decoder.conv_in.bias",
    "encoder.head.0.gamma": "encoder.norm_out.gamma", "encoder.head.2.weight": "encoder.conv_out.weight",
    "encoder.head.2.bias": "encoder.conv_out.bias", "decoder.head.0.gamma": "decoder.norm_out.gamma",
    "decoder.head.2.weight": "decoder.conv_out.weight", "decoder.head.2.bias": "decoder.conv_out.bias",
    "conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
}  # fmt: skip
_MIDDLE = re.compile(r"^(encoder|decoder)\.middle\.(\d)\.(.+)$")
_BLOCK = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)$")


def is_wan22_layout(state: dict[str, torch.Tensor]) -> bool:
    """The original Wan 2.2 VAE layout (nested residual down / up blocks)."""
    return "encoder.downsamples.0.downsamples.0.residual.0.gamma" in state


def _original_key(key: str, num_res_blocks: int) -> str:
    middle = _MIDDLE.match(key)
    if key in _FIXED:
        return _FIXED[key]
    if middle:
        part, index, tail = middle.groups()
        if index == "1":
            return f"{part}.mid_block.attentions.0.{tail}"
        return f"{part}.mid_block.resnets.{int(index) // 2}.{_RESIDUAL.get(tail, tail)}"
    block = _BLOCK.match(key)
    if not block:
        raise KeyError(key)
    part, _, index, sub, tail = block.groups()
    resnets = num_res_blocks if part == "encoder" else num_res_blocks + 1
    kind = "down_blocks" if part == "encoder" else "up_blocks"
    if int(sub) < resnets:
        return f"{part}.{kind}.{index}.resnets.{sub}.{_RESIDUAL[tail]}"
    sampler = "downsampler" if part == "encoder" else "upsampler"
    return f"{part}.{kind}.{index}.{sampler}.{tail}"


def original_to_diffusers(state: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Original Wan 2.2 keys -> diffusers keys. Raises ``KeyError`` naming a key of another layout."""
    return {_original_key(k, num_res_blocks): v for k, v in state.items()}


def diffusers_to_original(state: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """diffusers keys -> original Wan 2.2 keys (the inverse map; the tiny kit writes its VAE with it)."""
    inverse: dict[str, str] = {}
    for key in state:
        for candidate in _original_candidates(key, num_res_blocks):
            try:
                if _original_key(candidate, num_res_blocks) == key:
                    inverse[key] = candidate
                    break
            except KeyError:
                continue
        if key not in inverse:
            raise KeyError(f"unmapped diffusers Wan 2.2 VAE key: {key}")
    return {inverse[k]: v for k, v in state.items()}


def _original_candidates(key: str, num_res_blocks: int) -> list[str]:
    """Original-layout keys that could map to the diffusers ``key`` (checked by the forward map)."""
    out = [k for k, v in _FIXED.items() if v == key]
    m = re.match(r"^(encoder|decoder)\.mid_block\.(attentions|resnets)\.(\d)\.(.+)$", key)
    if m:
        part, kind, index, tail = m.groups()
        original = {v: k for k, v in _RESIDUAL.items()}.get(tail, tail)
        out.append(f"{part}.middle.1.{tail}" if kind == "attentions" else f"{part}.middle.{2 * int(index)}.{original}")
    m = re.match(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.+)$", key)
    if m:
        part, _, index, what, sub, tail = m.groups()
        kind = "downsamples" if part == "encoder" else "upsamples"
        if sub is not None:
            out.append(f"{part}.{kind}.{index}.{kind}.{sub}.{ {v: k for k, v in _RESIDUAL.items()}[tail] }")
        else:
            resnets = num_res_blocks if part == "encoder" else num_res_blocks + 1
            out.append(f"{part}.{kind}.{index}.{kind}.{resnets}.{tail}")
    return out


def diffusers_config(state: dict[str, torch.Tensor]) -> dict:
    """``AutoencoderKLWan`` arguments of a Wan 2.2 VAE from its diffusers-layout weights."""
    return {
        "base_dim": state["encoder.conv_in.weight"].shape[0],
        "decoder_base_dim": state["decoder.conv_out.weight"].shape[1],
        "z_dim": state["post_quant_conv.weight"].shape[0],
        "is_residual": True,
        "patch_size": PATCH,
        "in_channels": 3 * PATCH * PATCH,
        "out_channels": 3 * PATCH * PATCH,
        "temperal_downsample": [False, True, True],
        "scale_factor_spatial": SPATIAL_STRIDE,
        "latents_mean": LATENTS_MEAN,
        "latents_std": LATENTS_STD,
    }


def is_wan22_diffusers(state: dict[str, torch.Tensor]) -> bool:
    """diffusers-layout weights of a Wan 2.2 VAE (12 patchified input channels)."""
    weight = state.get("encoder.conv_in.weight")
    return weight is not None and weight.shape[1] == 3 * PATCH * PATCH
