"""The VAE loader against the released key layout (Wan2.1_VAE.pth / ComfyUI wan_2.1_vae.safetensors), written
from the Wan reference (wan/modules/vae.py: WanVAE_ with dim 96, z_dim 16, dim_mult [1, 2, 4, 4],
2 residual blocks, no attention scales, temperal_downsample [False, True, True]), not from our key map."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from wantrainer.models.wan.vae import WanVAE, build_autoencoder, original_to_diffusers


def _conv(shapes, name, out_dim, in_dim, *kernel):
    shapes[f"{name}.weight"] = (out_dim, in_dim, *kernel)
    shapes[f"{name}.bias"] = (out_dim,)


def _residual(shapes, name, in_dim, out_dim):
    shapes[f"{name}.residual.0.gamma"] = (in_dim, 1, 1, 1)  # RMS_norm(images=False)
    _conv(shapes, f"{name}.residual.2", out_dim, in_dim, 3, 3, 3)
    shapes[f"{name}.residual.3.gamma"] = (out_dim, 1, 1, 1)
    _conv(shapes, f"{name}.residual.6", out_dim, out_dim, 3, 3, 3)
    if in_dim != out_dim:
        _conv(shapes, f"{name}.shortcut", out_dim, in_dim, 1, 1, 1)


def _middle(shapes, part, dim):
    _residual(shapes, f"{part}.middle.0", dim, dim)
    shapes[f"{part}.middle.1.norm.gamma"] = (dim, 1, 1)  # RMS_norm(images=True)
    _conv(shapes, f"{part}.middle.1.to_qkv", 3 * dim, dim, 1, 1)
    _conv(shapes, f"{part}.middle.1.proj", dim, dim, 1, 1)
    _residual(shapes, f"{part}.middle.2", dim, dim)


def reference_vae_shapes(dim: int, z_dim: int = 16) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    # encoder: dims [d, d, 2d, 4d, 4d]; downsamples 0-1 res, 2 down2d, 3-4 res, 5 down3d, 6-7 res, 8 down3d, 9-10 res
    _conv(shapes, "encoder.conv1", dim, 3, 3, 3, 3)
    index, in_dim = 0, dim
    for level, out_dim in enumerate((dim, 2 * dim, 4 * dim, 4 * dim)):
        for _ in range(2):
            _residual(shapes, f"encoder.downsamples.{index}", in_dim, out_dim)
            index, in_dim = index + 1, out_dim
        if level < 3:
            _conv(shapes, f"encoder.downsamples.{index}.resample.1", out_dim, out_dim, 3, 3)
            if level > 0:  # downsample3d
                _conv(shapes, f"encoder.downsamples.{index}.time_conv", out_dim, out_dim, 3, 1, 1)
            index += 1
    _middle(shapes, "encoder", 4 * dim)
    shapes["encoder.head.0.gamma"] = (4 * dim, 1, 1, 1)
    _conv(shapes, "encoder.head.2", 2 * z_dim, 4 * dim, 3, 3, 3)
    _conv(shapes, "conv1", 2 * z_dim, 2 * z_dim, 1, 1, 1)
    _conv(shapes, "conv2", z_dim, z_dim, 1, 1, 1)
    # decoder: dims [4d, 4d, 4d, 2d, d]; levels of 3 res blocks, then upsample3d, upsample3d, upsample2d
    _conv(shapes, "decoder.conv1", 4 * dim, z_dim, 3, 3, 3)
    _middle(shapes, "decoder", 4 * dim)
    index, in_dim = 0, 4 * dim
    for level, out_dim in enumerate((4 * dim, 4 * dim, 2 * dim, dim)):
        if level > 0:
            in_dim //= 2  # the previous upsample halved the channels
        for _ in range(3):
            _residual(shapes, f"decoder.upsamples.{index}", in_dim, out_dim)
            index, in_dim = index + 1, out_dim
        if level < 3:
            _conv(shapes, f"decoder.upsamples.{index}.resample.1", out_dim // 2, out_dim, 3, 3)
            if level < 2:  # upsample3d
                _conv(shapes, f"decoder.upsamples.{index}.time_conv", 2 * out_dim, out_dim, 3, 1, 1)
            index += 1
    shapes["decoder.head.0.gamma"] = (dim, 1, 1, 1)
    _conv(shapes, "decoder.head.2", 3, dim, 3, 3, 3)
    return shapes


def test_the_released_vae_layout_builds_the_96_wide_model():
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in reference_vae_shapes(96).items()}
        model = build_autoencoder(original_to_diffusers(state))  # strict: every key and shape
        want = AutoencoderKLWan(base_dim=96, z_dim=16)
    assert model.config.base_dim == 96 and model.config.z_dim == 16
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}


def test_a_comfyui_style_file_in_the_released_layout_encodes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.05 for k, s in reference_vae_shapes(8).items()}
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    torch.save(state, str(tmp_path / "Wan2.1_VAE.pth"))
    pixels = torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1
    from_pth = WanVAE.load(tmp_path / "Wan2.1_VAE.pth").encode(pixels)
    from_comfy = WanVAE.load(tmp_path / "wan_2.1_vae.safetensors").encode(pixels)
    assert from_pth.shape == (1, 16, 2, 2, 2)
    assert torch.allclose(from_pth, from_comfy, rtol=0.05, atol=0.05)  # bf16 weights vs fp32
