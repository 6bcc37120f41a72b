"""Wan VAE wrapper: parity with diffusers' AutoencoderKLWan on the kit weights, file formats, options, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file, save_file

from wantrainer.errors import UserError
from wantrainer.models.wan.vae import WanVAE, _CpuFeatureCache, diffusers_to_original

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Wan 2.1's per-channel latent statistics (wan/modules/vae.py; diffusers' Wan config latents_mean / latents_std)
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@pytest.fixture(scope="module")
def reference(tiny_kit):
    """diffusers' own model built from the kit file with diffusers' own converter."""
    state = convert_wan_vae_to_diffusers(load_file(str(tiny_kit.vae)))
    model = AutoencoderKLWan(base_dim=state["encoder.conv_in.weight"].shape[0], z_dim=16)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def vae(tiny_kit):
    return WanVAE.load(tiny_kit.vae)


def _pixels(frames=5, height=16, width=32, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


def _normalise(mu):
    mean = torch.tensor(WAN_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN_STD).view(1, 16, 1, 1, 1)
    return (mu - mean) * (1.0 / std)


def test_encode_decode_match_diffusers(vae, reference):
    pixels = _pixels()
    with torch.no_grad():
        expected = _normalise(reference.encode(pixels).latent_dist.mean)
    latents = vae.encode(pixels)
    assert latents.shape == (2, 16, 2, 2, 4) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)

    with torch.no_grad():
        mean, std = torch.tensor(WAN_MEAN).view(1, 16, 1, 1, 1), torch.tensor(WAN_STD).view(1, 16, 1, 1, 1)
        expected_pixels = reference.decode(latents * std + mean).sample
    decoded = vae.decode(latents)
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, expected_pixels, rtol=0, atol=1e-5)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_latent_statistics_are_wans(vae):
    torch.testing.assert_close(vae.mean.flatten(), torch.tensor(WAN_MEAN))
    torch.testing.assert_close(1.0 / vae.inv_std.flatten(), torch.tensor(WAN_STD))
    assert vae.model.config.base_dim == 16  # inferred from the weights


def test_pth_and_diffusers_layout_files_give_the_same_latents(vae, tiny_kit, tmp_path):
    original = load_file(str(tiny_kit.vae))
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    torch.save(original, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(convert_wan_vae_to_diffusers(dict(original)), str(tmp_path / "diffusers_vae.safetensors"))
    save_file({f"first_stage_model.{k}": v for k, v in original.items()}, str(tmp_path / "prefixed.safetensors"))
    pixels = _pixels(frames=1)
    expected = vae.encode(pixels)
    for name in ("Wan2.1_VAE.pth", "legacy.pth", "diffusers_vae.safetensors", "prefixed.safetensors"):
        assert torch.equal(WanVAE.load(tmp_path / name).encode(pixels), expected), name


def test_inverse_key_map_round_trips(tiny_kit):
    original = load_file(str(tiny_kit.vae))
    converted = convert_wan_vae_to_diffusers(dict(original))
    back = diffusers_to_original(converted)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_cache_cpu_gives_identical_latents_and_keeps_slots_on_cpu(tiny_kit, vae):
    pixels = _pixels(frames=5)
    cached = WanVAE.load(tiny_kit.vae, cache_cpu=True)
    assert torch.equal(cached.encode(pixels), vae.encode(pixels))
    latents = vae.encode(pixels)
    assert torch.equal(cached.decode(latents), vae.decode(latents))
    assert isinstance(cached.model._enc_feat_map, _CpuFeatureCache)
    assert not isinstance(vae.model._enc_feat_map, _CpuFeatureCache)

    # the mechanism: slots are stored on the CPU and handed back on the model's device
    slots = _CpuFeatureCache([None, None], torch.device("meta"))
    slots[0] = torch.ones(2)
    slots[1] = "Rep"
    assert list.__getitem__(slots, 0).device.type == "cpu"
    assert slots[0].device.type == "meta" and slots[1] == "Rep"


def test_tiling_encodes_large_frames_in_tiles(tiny_kit, vae):
    tiled = WanVAE.load(tiny_kit.vae, tiling=True)
    assert tiled.model.use_tiling and not vae.model.use_tiling
    pixels = _pixels(frames=1, height=288, width=288, batch=1)
    a, b = tiled.encode(pixels), vae.encode(pixels)
    assert a.shape == b.shape == (1, 16, 1, 36, 36)
    assert not torch.equal(a, b)  # tiles really were used
    assert (a - b).abs().mean() < 0.2 * b.abs().mean()  # and blended into nearly the same latents


def test_bfloat16_storage_and_dtype_option(tiny_kit):
    half = WanVAE.load(tiny_kit.vae, dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.dtype == torch.bfloat16


def test_bad_inputs(vae, tiny_kit, tmp_path):
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(_pixels(frames=4))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_pixels(frames=1, height=36))
    with pytest.raises(UserError, match="not found"):
        WanVAE.load(tmp_path / "missing.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a Wan VAE"):
        WanVAE.load(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        WanVAE.load(tmp_path / "broken.safetensors")
    state = AutoencoderKLWan(base_dim=8, z_dim=48).state_dict()
    save_file(state, str(tmp_path / "wan22_vae.safetensors"))
    with pytest.raises(UserError, match="48 latent channels"):
        WanVAE.load(tmp_path / "wan22_vae.safetensors")
