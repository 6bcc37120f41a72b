"""The Wan 2.2 VAE (TI2V-5B): the original layout, written from Wan's wan/modules/vae2_2.py, maps onto diffusers'
AutoencoderKLWan (is_residual, patch 2) tensor for tensor; encode / decode equal diffusers' on the same weights
with Wan 2.2's 48-channel latent mean / std."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from wantrainer.models.wan import vae22
from wantrainer.models.wan.vae import WanVAE

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def reference_shapes(dim=160, dec_dim=256, z_dim=48, mult=(1, 2, 4, 4), nres=2, tdown=(False, True, True)):
    """Every tensor of Wan's ``WanVAE_`` (vae2_2.py) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv3(name, cout, cin, k=(3, 3, 3)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, *k), (cout,)

    def residual(p, cin, cout):  # RMS_norm(images=False), SiLU, conv, RMS_norm, SiLU, Dropout, conv; 1x1 shortcut
        shapes[f"{p}.residual.0.gamma"], shapes[f"{p}.residual.3.gamma"] = (cin, 1, 1, 1), (cout, 1, 1, 1)
        conv3(f"{p}.residual.2", cout, cin)
        conv3(f"{p}.residual.6", cout, cout)
        if cin != cout:
            conv3(f"{p}.shortcut", cout, cin, (1, 1, 1))

    def resample(p, d, mode):
        shapes[f"{p}.resample.1.weight"], shapes[f"{p}.resample.1.bias"] = (d, d, 3, 3), (d,)
        if mode == "upsample3d":
            conv3(f"{p}.time_conv", 2 * d, d, (3, 1, 1))
        if mode == "downsample3d":
            conv3(f"{p}.time_conv", d, d, (3, 1, 1))

    def middle(p, d):
        residual(f"{p}.middle.0", d, d)
        shapes[f"{p}.middle.1.norm.gamma"] = (d, 1, 1)
        shapes[f"{p}.middle.1.to_qkv.weight"], shapes[f"{p}.middle.1.to_qkv.bias"] = (3 * d, d, 1, 1), (3 * d,)
        shapes[f"{p}.middle.1.proj.weight"], shapes[f"{p}.middle.1.proj.bias"] = (d, d, 1, 1), (d,)
        residual(f"{p}.middle.2", d, d)

    dims = [dim * u for u in (1, *mult)]
    conv3("encoder.conv1", dims[0], 12)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(nres):
            residual(f"encoder.downsamples.{i}.downsamples.{j}", cin if j == 0 else cout, cout)
        if i != len(mult) - 1:
            resample(f"encoder.downsamples.{i}.downsamples.{nres}", cout, "downsample3d" if tdown[i] else "downsample2d")
    middle("encoder", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3("encoder.head.2", 2 * z_dim, dims[-1])
    conv3("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv3("conv2", z_dim, z_dim, (1, 1, 1))
    dims = [dec_dim * u for u in (mult[-1], *mult[::-1])]
    tup = tdown[::-1]
    conv3("decoder.conv1", dims[0], z_dim)
    middle("decoder", dims[0])
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(nres + 1):
            residual(f"decoder.upsamples.{i}.upsamples.{j}", cin if j == 0 else cout, cout)
        if i != len(mult) - 1:
            resample(f"decoder.upsamples.{i}.upsamples.{nres + 1}", cout, "upsample3d" if tup[i] else "upsample2d")
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv3("decoder.head.2", 12, dims[-1])
    return shapes


@pytest.mark.parametrize("dims", [(160, 256), (16, 24)], ids=["released", "tiny"])
def test_reference_layout_maps_onto_diffusers_tensor_for_tensor(dims):
    ref = reference_shapes(*dims)
    fake = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    mapped = vae22.original_to_diffusers(fake)
    with torch.device("meta"):
        model = AutoencoderKLWan(**vae22.diffusers_config(mapped))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    assert len(mapped) == len(ref)  # one-to-one
    assert set(vae22.diffusers_to_original(mapped)) == set(ref)


def test_kit_vae22_encodes_and_decodes_as_diffusers(tiny_kit):
    original = {k: v.float() for k, v in load_file(str(tiny_kit.vae22)).items()}
    assert vae22.is_wan22_layout(original)
    ref = AutoencoderKLWan(**vae22.diffusers_config(vae22.original_to_diffusers(original))).eval()
    ref.load_state_dict(vae22.original_to_diffusers(original))
    vae = WanVAE.load(tiny_kit.vae22)
    assert (vae.latent_channels, vae.spatial_stride) == (48, 16)
    pixels = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, 48, 2, 2, 3)
    with torch.no_grad():
        mu = ref.encode(pixels).latent_dist.mean
        mean = torch.tensor(vae22.LATENTS_MEAN).view(1, 48, 1, 1, 1)
        std = torch.tensor(vae22.LATENTS_STD).view(1, 48, 1, 1, 1)
        assert (latents - (mu - mean) / std).abs().max().item() < 1e-5
        decoded = vae.decode(latents)
        want = ref.decode(latents * std + mean).sample
    assert decoded.shape == pixels.shape
    assert (decoded - want).abs().max().item() < 1e-5
    assert want.abs().max().item() > 0.05
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 24, 24))
