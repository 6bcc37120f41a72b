"""Our Wan DiT against diffusers' WanTransformer3DModel on the same random weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffusers_support import TINY, diffusers_twin, padded_context
from wantrainer.models.wan.configs import WAN_CONFIGS, WanModelConfig, known_config_name
from wantrainer.models.wan.transformer import WanModel

TINY_2HEADS = WanModelConfig(dim=256, ffn_dim=384, num_heads=2, num_layers=2, text_dim=64)


def make_pair(config: WanModelConfig, seed: int = 0) -> tuple[WanModel, WanTransformer3DModel]:
    torch.manual_seed(seed)
    ours = WanModel(config).eval()
    with torch.no_grad():  # random biases / norm weights so that every parameter matters
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ours, diffusers_twin(ours)


@pytest.mark.parametrize("config", [TINY, TINY_2HEADS], ids=["dim128", "dim256"])
def test_parity_with_diffusers_per_sample_timesteps(config):
    ours, ref = make_pair(config)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 8, 12, generator=gen)
    context = [
        torch.randn(7, config.text_dim, generator=gen),
        torch.randn(19, config.text_dim, generator=gen),
    ]
    with torch.no_grad():
        for t in ([1.0, 999.0], [250.0, 500.0], [873.5, 12.25]):
            timestep = torch.tensor(t)
            got = ours(x, timestep, context)
            want = ref(x, timestep, padded_context(context), return_dict=False)[0]
            assert got.shape == want.shape == x.shape
            assert (got - want).abs().max().item() < 1e-5
            assert want.abs().max().item() > 0.1  # a meaningful output, not a near-zero one


def test_parity_with_diffusers_per_token_timesteps():
    ours, ref = make_pair(TINY, seed=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    seq_len = 2 * 4 * 4
    timestep = torch.rand(2, seq_len, generator=gen) * 1000  # Wan 2.2 style: one timestep per token
    context = [torch.randn(3, 64, generator=gen), torch.randn(40, 64, generator=gen)]
    with torch.no_grad():
        got = ours(x, timestep, context)
        want = ref(x, timestep, padded_context(context), return_dict=False)[0]
        assert (got - want).abs().max().item() < 1e-5
        # a constant per-token timestep is the same as the per-sample one
        same = ours(x, torch.full((2, seq_len), 400.0), context)
        assert torch.allclose(same, ours(x, torch.tensor([400.0, 400.0]), context), atol=1e-5)


def test_dropped_caption_is_all_zero_context():
    ours, _ = make_pair(TINY)
    x = torch.randn(1, 16, 1, 4, 4)
    with torch.no_grad():
        dropped = ours(x, torch.tensor([300.0]), [torch.zeros(0, 64)])
        zeros = ours(x, torch.tensor([300.0]), [torch.zeros(5, 64)])
    assert torch.equal(dropped, zeros)


def test_gradients_reach_blocks_with_default_init():
    torch.manual_seed(0)
    model = WanModel(TINY)
    out = model(torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), [torch.randn(4, 64)])
    out.square().mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert model.blocks[1].ffn[0].weight.grad.abs().sum() > 0


def test_keep_in_fp32_modules():
    model = WanModel(TINY).to_compute_dtype(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if any(part in WanModel._keep_in_fp32_modules for part in name.split(".")):
            assert p.dtype == torch.float32, name
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_projection[1].weight.dtype == torch.float32


def test_named_configs():
    assert WAN_CONFIGS["wan21_t2v_1.3b"].head_dim == 128
    assert WAN_CONFIGS["wan21_t2v_14b"].num_heads == 40
    assert (
        known_config_name(WanModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30))
        == "wan21_t2v_1.3b"
    )
    assert known_config_name(TINY) is None
