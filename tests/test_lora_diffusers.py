"""A saved LoRA loads through diffusers' Wan loader and gives the same output as our wrapped model."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from diffusers_support import TINY, diffusers_twin, random_inputs, twin_output
from wantrainer.config.training import NetworkConfig
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.formats import from_kohya, load_lora, read_safetensors, save_lora
from wantrainer.networks.lora_wan import create_network
from wantrainer.utils.atomic import save_safetensors_atomic

pytest.importorskip("peft")  # diffusers needs peft to inject LoRA layers

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Our tiny DiT with a LoRA whose up weights are non-zero, the LoRA saved in fp32, and a reference output."""
    torch.manual_seed(0)
    dit = WanModel(TINY).eval()
    ref_base = diffusers_twin(dit)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=2.0), dit)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    network.apply_to(dit)
    x, t, ctx = random_inputs(1, (2, 16, 2, 4, 6), [250.0, 800.0], [6, 11])
    with torch.no_grad():
        ours = dit(x, t, ctx)
    base = twin_output(ref_base, x, t, ctx)
    path = tmp_path_factory.mktemp("lora") / "wan_lora.safetensors"
    save_lora(path, network.state_dict(), {"ss_network_dim": "4"}, dtype="fp32")
    return {"dit": dit, "x": x, "t": t, "ctx": ctx, "ours": ours, "base": base, "path": path}


def diffusers_output(trained, lora_path) -> torch.Tensor:
    ref = diffusers_twin(trained["dit"])  # the state dict of the wrapped model is the base model
    sd = WanPipeline.lora_state_dict(str(lora_path))
    WanPipeline.load_lora_into_transformer(sd, transformer=ref)
    return twin_output(ref, trained["x"], trained["t"], trained["ctx"])


def test_saved_lora_matches_in_diffusers(trained):
    assert (trained["ours"] - trained["base"]).abs().max().item() > 1e-2  # the LoRA changes the output
    got = diffusers_output(trained, trained["path"])
    assert (got - trained["ours"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", ["diffusion_model", "diffusers"])
def test_converted_layouts_match_in_diffusers_and_reload(trained, tmp_path, layout):
    sd, _ = read_safetensors(trained["path"])
    converted = from_kohya(sd, layout)
    assert not any(k.endswith(".alpha") for k in converted)
    out = tmp_path / f"{layout}.safetensors"
    save_safetensors_atomic(converted, out)
    got = diffusers_output(trained, out)
    assert (got - trained["ours"]).abs().max().item() < 1e-4
    # back to kohya through load_lora: alpha = rank, scale folded into down -> same product
    back, _ = load_lora(out)
    for name in ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_1_ffn_2"):
        assert back[f"{name}.alpha"].item() == 4.0
        before = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"] * (sd[f"{name}.alpha"] / 4)
        after = back[f"{name}.lora_up.weight"] @ back[f"{name}.lora_down.weight"]
        torch.testing.assert_close(after, before)


def test_rslora_file_matches_in_diffusers(tmp_path):
    """use_rslora: scale alpha / sqrt(rank), stored as .alpha = alpha * sqrt(rank) so loaders using alpha / rank agree."""
    torch.manual_seed(1)
    dit = WanModel(TINY).eval()
    ref = diffusers_twin(dit)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=3.0, use_rslora=True), dit)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    assert network.lora_modules[0].scale == pytest.approx(1.5)  # 3 / sqrt(4), not 3 / 4
    network.apply_to(dit)
    x, t, ctx = random_inputs(2, (1, 16, 2, 4, 6), [600.0], [7])
    with torch.no_grad():
        ours = dit(x, t, ctx)
    path = tmp_path / "rslora.safetensors"
    save_lora(path, network.state_dict(), {}, dtype="fp32")
    WanPipeline.load_lora_into_transformer(WanPipeline.lora_state_dict(str(path)), transformer=ref)
    assert (twin_output(ref, x, t, ctx) - ours).abs().max().item() < 1e-4
