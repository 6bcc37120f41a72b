"""Attention backends of the DiT: sdpa vs split_attn, and clear errors for the unavailable ones."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from wantrainer.errors import UserError
from wantrainer.models.wan.attention import ATTN_MODES, attention
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel

TINY = WanModelConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64)


def test_split_attn_matches_sdpa_in_model_forward_and_backward():
    torch.manual_seed(0)
    model = WanModel(TINY)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 2, 8, 8, generator=gen)
    context = [torch.randn(n, 64, generator=gen) for n in (2, 30, 0)]
    timestep = torch.tensor([10.0, 500.0, 990.0])
    outputs, grads = [], []
    for mode in ("sdpa", "split_attn"):
        model.zero_grad()
        model.set_attn_mode(mode)
        assert all(b.self_attn.attn_mode == mode and b.cross_attn.attn_mode == mode for b in model.blocks)
        out = model(x, timestep, context)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(model.blocks[0].self_attn.q.weight.grad.clone())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_attention_against_explicit_softmax():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 3, 8, generator=gen) for n in (5, 7, 7))
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, dim=-1)
    want = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    for mode in ("sdpa", "split_attn"):
        assert torch.allclose(attention(q, k, v, mode), want, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "package", "hint"),
    [("flash_attn", "flash_attn", "pip install flash-attn"), ("sage_attn", "sageattention", "pip install sage"),
     ("xformers", "xformers", "pip install xformers")],
)  # fmt: skip
def test_missing_backend_is_a_clear_error(mode, package, hint):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    model = WanModel(TINY)
    with pytest.raises(UserError, match=hint) as err:
        model.set_attn_mode(mode)
    assert "sdpa" in str(err.value)
    assert model.attn_mode == "sdpa"
    with pytest.raises(UserError, match="not installed"):
        WanModel(TINY, attn_mode=mode)


def test_sage_attn_is_inference_only():
    assert "sage_attn" in ATTN_MODES
    with pytest.raises(UserError, match="inference only"):
        WanModel(TINY).set_attn_mode("sage_attn", for_training=True)
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    with pytest.raises(UserError, match="inference only"):
        attention(q, q, q, "sage_attn")


def test_half_precision_backends_refuse_fp32():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(UserError, match="fp16/bf16"):
        attention(q, q, q, "flash_attn")


@pytest.mark.parametrize("mode", ["flash_attn", "sage_attn"])
def test_cuda_only_backends_refuse_cpu_tensors(mode):
    q = torch.randn(1, 4, 2, 8).to(torch.bfloat16)  # refused before any kernel runs: no bf16 math on the CPU
    with pytest.raises(UserError, match="CUDA GPU only"):
        attention(q, q, q, mode)


def test_unknown_mode():
    with pytest.raises(UserError, match="unknown attn_mode"):
        WanModel(TINY).set_attn_mode("flash3")
