"""LoRA files of the Wan 2.1 I2V / FLF2V models (with the image-branch k_img / v_img projections) load in diffusers'
Wan loader and give our output, and carry the kohya names ComfyUI derives from the model's own keys."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanImageToVideoPipeline

from diffusers_support import diffusers_twin, padded_context
from wantrainer.config.training import NetworkConfig
from wantrainer.devkit.tiny_kit import TINY_CLIP_TOKENS
from wantrainer.models.wan.loading import load_wan_dit
from wantrainer.networks.formats import read_safetensors, save_lora
from wantrainer.networks.lora_wan import create_network

pytest.importorskip("peft")


@pytest.mark.parametrize("which", ["dit_wan21_i2v", "dit_wan21_flf2v"])
def test_i2v_lora_matches_in_diffusers_and_names_the_image_projections(tiny_kit, tmp_path, which):
    dit = load_wan_dit(getattr(tiny_kit, which), dtype=torch.float32).eval()
    config = dit.config
    network = create_network(NetworkConfig(network_dim=4, network_alpha=2.0), dit)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    ref = diffusers_twin(dit)  # the base weights, before the LoRA is applied
    network.apply_to(dit)
    x = torch.randn(1, 16, 2, 4, 6, generator=gen)
    y = torch.randn(1, 20, 2, 4, 6, generator=gen)
    clip = torch.randn(config.clip_images, TINY_CLIP_TOKENS, config.image_dim, generator=gen)
    ctx = [torch.randn(6, 64, generator=gen)]
    t = torch.tensor([600.0])
    with torch.no_grad():
        ours = dit(x, t, ctx, clip_fea=clip[None], y=y)
        base = ref(torch.cat([x, y], 1), t, padded_context(ctx), encoder_hidden_states_image=clip,
                   return_dict=False)[0]
    path = tmp_path / "i2v_lora.safetensors"
    save_lora(path, network.state_dict(), {"ss_network_dim": "4"}, dtype="fp32")

    sd, _ = read_safetensors(path)
    # ComfyUI names a LoRA key after the model weight: "lora_unet_" + the module path with "." -> "_"
    for block in range(config.num_layers):
        for proj in ("k_img", "v_img"):
            assert f"lora_unet_blocks_{block}_cross_attn_{proj}.lora_down.weight" in sd
    assert (ours - base).abs().max().item() > 1e-2  # the LoRA (image projections included) changes the output

    lora_sd = WanImageToVideoPipeline.lora_state_dict(str(path))
    assert any("add_k_proj" in k for k in lora_sd)
    WanImageToVideoPipeline.load_lora_into_transformer(lora_sd, transformer=ref)
    with torch.no_grad():
        got = ref(torch.cat([x, y], 1), t, padded_context(ctx), encoder_hidden_states_image=clip,
                  return_dict=False)[0]
    assert (got - ours).abs().max().item() < 1e-4

    # the image-projection LoRA carries part of the update: without it the output differs
    with torch.no_grad():
        for path_, module in zip(network.module_paths, network.lora_modules):
            if path_.endswith(("k_img", "v_img")):
                module.lora_up.weight.zero_()
        without = dit(x, t, ctx, clip_fea=clip[None], y=y)
    assert (without - ours).abs().max().item() > 1e-3
