"""The Wan LoRA network on the real tiny WanModel: targets, invariants, dropouts, LoRA+, weights I/O."""

from __future__ import annotations

import math

import pytest
import torch

from wantrainer.config.training import NetworkConfig
from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.formats import load_lora, save_lora
from wantrainer.networks.lora_wan import create_network

TINY = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)


def tiny_dit(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    return WanModel(TINY).eval()


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 1, 4, 4, generator=gen)
    context = [torch.randn(5, 64, generator=gen), torch.randn(3, 64, generator=gen)]
    return x, torch.tensor([300.0, 700.0]), context


def randomise_up(network, seed: int = 2, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * std)


def net(dit, **kw):
    return create_network(NetworkConfig(**kw), dit)


def test_default_targets_and_kohya_keys():
    dit = tiny_dit()
    network = net(dit, network_dim=4, network_alpha=2.0)
    assert len(network.module_paths) == 2 * 10  # q/k/v/o x2 + ffn.0 + ffn.2 per block
    assert network.module_paths[:2] == ["blocks.0.self_attn.q", "blocks.0.self_attn.k"]
    keys = set(network.state_dict())
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys
    assert "lora_unet_blocks_1_ffn_2.lora_up.weight" in keys
    assert "lora_unet_blocks_1_cross_attn_o.alpha" in keys
    assert len(keys) == 20 * 3
    m = network.lora_modules[0]
    assert m.lora_down.weight.shape == (4, 128) and m.lora_up.weight.abs().sum() == 0
    # Kaiming-uniform(a=sqrt(5)) bound = 1 / sqrt(fan_in)
    assert m.lora_down.weight.abs().max().item() <= 1 / math.sqrt(128) + 1e-7
    assert m.lora_down.weight.std().item() > 0.5 / math.sqrt(3 * 128)
    assert m.scale == pytest.approx(0.5)
    # the LoRA modules are never children of the DiT
    network.apply_to(dit)
    assert not any("lora" in name for name, _ in dit.named_modules())


def test_include_exclude_patterns():
    dit = tiny_dit()
    only_ffn = net(dit, network_args=["include_patterns=[r'blocks\\.\\d+\\.ffn\\..*']"])
    assert only_ffn.module_paths == ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]
    no_cross = net(dit, network_args=["exclude_patterns=['.*cross_attn.*', 'blocks.1.ffn.2']", "verbose=True"])
    assert len(no_cross.module_paths) == 2 * 6 - 1
    assert not any("cross_attn" in p for p in no_cross.module_paths)
    with pytest.raises(UserError, match="no Linear"):
        net(dit, network_args=["include_patterns=['head.head']"])
    with pytest.raises(UserError, match="bad regex"):
        net(dit, network_args=["exclude_patterns=['(']"])
    with pytest.raises(UserError, match="network_args"):
        net(dit, network_args=["dropout_all=1"])
    with pytest.raises(UserError, match="loraplus_lr_ratio is a top-level key"):
        net(dit, network_args=["loraplus_lr_ratio=4"])
    with pytest.raises(UserError, match="list of regex"):
        net(dit, network_args=["include_patterns='blocks'"])
    with pytest.raises(UserError, match="not available"):
        net(dit, network_module="lycoris.locon")


def test_zero_init_is_identity_and_merge_matches_wrapped_forward():
    dit = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        base_out = dit(x, t, ctx)
        network = net(dit, network_dim=4, network_alpha=8.0)
        network.apply_to(dit)
        assert torch.equal(dit(x, t, ctx), base_out)  # up = 0
        randomise_up(network)
        lora_out = dit(x, t, ctx)
        assert (lora_out - base_out).abs().max().item() > 1e-3
        network.set_multiplier(0.5)
        half = dit(x, t, ctx)
        network.set_multiplier(1.0)
        network.remove()
        assert torch.equal(dit(x, t, ctx), base_out)  # original forward restored
        # merge: W + scale * B @ A gives the same output as the wrapped forward
        w_before = dit.blocks[0].self_attn.q.weight.clone()
        network.merge_to(dit)
        m = network.lora_modules[0]
        expected_w = w_before + 2.0 * m.lora_up.weight @ m.lora_down.weight
        torch.testing.assert_close(dit.blocks[0].self_attn.q.weight, expected_w)
        torch.testing.assert_close(dit(x, t, ctx), lora_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(half, lora_out)


def test_base_frozen_only_lora_gets_gradients():
    dit = tiny_dit()
    network = net(dit, network_dim=4)
    network.apply_to(dit)
    randomise_up(network)
    x, t, ctx = inputs()
    dit(x, t, ctx).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in dit.parameters())
    grads = [m.lora_down.weight.grad for m in network.lora_modules] + [m.lora_up.weight.grad for m in network.lora_modules]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_rslora_scale_and_saved_alpha():
    dit = tiny_dit()
    network = net(dit, network_dim=16, network_alpha=8.0, use_rslora=True)
    m = network.lora_modules[0]
    assert m.scale == pytest.approx(8.0 / 4.0)  # alpha / sqrt(rank)
    assert m.alpha.item() == pytest.approx(32.0)  # saved alpha / rank = 2.0 for every loader


def test_dropouts_only_in_training():
    dit = tiny_dit()
    x, t, ctx = inputs()
    network = net(dit, network_dim=8, network_dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    network.apply_to(dit)
    randomise_up(network)
    network.eval()
    with torch.no_grad():
        a, b = dit(x, t, ctx), dit(x, t, ctx)
        assert torch.equal(a, b)
        network.train()
        torch.manual_seed(0)
        c = dit(x, t, ctx)
        torch.manual_seed(1)
        d = dit(x, t, ctx)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)
    # module_dropout close to 1 skips every LoRA module: output equals the base model
    skip = net(dit, network_dim=8, module_dropout=0.999)
    network.remove()
    with torch.no_grad():
        base = dit(x, t, ctx)
        skip.apply_to(dit)
        randomise_up(skip)
        skip.train()
        torch.manual_seed(0)
        assert torch.equal(dit(x, t, ctx), base)


def test_loraplus_param_groups():
    dit = tiny_dit()
    plain = net(dit, network_dim=4).prepare_optimizer_params(1e-4)
    assert len(plain) == 1 and len(plain[0]["params"]) == 40 and plain[0]["lr"] == 1e-4
    groups = net(dit, network_dim=4, loraplus_lr_ratio=16.0).prepare_optimizer_params(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1.6e-3)]
    assert all(p.shape[0] == 4 for p in groups[0]["params"])  # down: [rank, in]
    assert all(p.shape[1] == 4 for p in groups[1]["params"])  # up: [out, rank]


def test_save_load_and_continue_from_network_weights(tmp_path):
    dit = tiny_dit()
    network = net(dit, network_dim=4, network_alpha=2.0)
    randomise_up(network)
    path = tmp_path / "lora.safetensors"
    save_lora(path, network.state_dict(), {"ss_network_dim": "4"}, dtype="fp32")
    sd, meta = load_lora(path)
    assert meta["ss_network_dim"] == "4" and sd["lora_unet_blocks_0_ffn_0.alpha"].item() == 2.0
    resumed = net(dit, network_dim=4, network_alpha=2.0, network_weights=path)
    for key, value in network.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    with pytest.raises(UserError, match=r"lora_unet_blocks_0_\w+\.lora_down\.weight has shape \[4, 128\], this network expects \[8, 128\]"):
        net(dit, network_dim=8, network_weights=path)
    with pytest.raises(UserError, match="not found"):
        net(dit, network_weights=tmp_path / "missing.safetensors")


def test_shared_lora_on_two_dits():
    """wan22 shared mode: one network wraps both experts; remove() restores both."""
    high, low = tiny_dit(0), tiny_dit(1)
    x, t, ctx = inputs()
    with torch.no_grad():
        base_high, base_low = high(x, t, ctx), low(x, t, ctx)
        network = net(high, network_dim=4)
        network.apply_to(high)
        network.apply_to(low)
        randomise_up(network)
        assert not torch.allclose(high(x, t, ctx), base_high)
        assert not torch.allclose(low(x, t, ctx), base_low)
        network.remove()
        assert torch.equal(high(x, t, ctx), base_high) and torch.equal(low(x, t, ctx), base_low)


def test_wraps_fp8_linears_and_block_swap(tmp_path):
    from wantrainer.models.wan.fp8 import FP8Linear
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.utils.atomic import save_safetensors_atomic

    path = tmp_path / "dit.safetensors"
    save_safetensors_atomic(tiny_dit().state_dict(), path)
    dit = load_wan_dit(path, dtype=torch.float32, fp8_base=True, fp8_scaled=True)
    assert isinstance(dit.blocks[0].self_attn.q, FP8Linear)
    x, t, ctx = inputs()
    with torch.no_grad():
        base = dit(x, t, ctx)
    network = net(dit, network_dim=4)
    network.apply_to(dit)
    dit.enable_block_swap(1, "cpu")
    dit.move_to_device_except_swap_blocks("cpu")
    dit.prepare_block_swap_before_forward()
    with torch.no_grad():
        assert torch.equal(dit(x, t, ctx), base)
    randomise_up(network)
    dit(x, t, ctx).square().mean().backward()
    assert all(m.lora_up.weight.grad.abs().sum() > 0 for m in network.lora_modules)
    with pytest.raises(UserError, match="fp8"):
        network.merge_to(dit)
