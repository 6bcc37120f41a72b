"""LoRA files for standalone sampling: expert assignment and merge == wrapped network."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.formats import save_lora
from wantrainer.networks.lora_wan import LoRANetwork
from wantrainer.sampling.loras import apply_lora_file, assign_loras


def test_assign_loras_by_suffix_order_and_errors():
    a, b = Path("x_low_noise.safetensors"), Path("x_high_noise.safetensors")
    assert assign_loras([a, b], two_experts=True) == {"high": b, "low": a}
    p, q = Path("first.safetensors"), Path("second.safetensors")
    assert assign_loras([p, q], two_experts=True) == {"high": p, "low": q}
    assert assign_loras([p], two_experts=True) == {"high": p, "low": p}
    assert assign_loras([], two_experts=False) == {"high": None, "low": None}
    with pytest.raises(UserError):
        assign_loras([p, q], two_experts=False)
    with pytest.raises(UserError):
        assign_loras([a, q], two_experts=True)


def _tiny_dit(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    cfg = WanModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, freq_dim=32, text_len=8)
    return WanModel(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    return x, torch.tensor([600.0]), [torch.randn(3, 16, generator=g)]


def test_merged_lora_file_matches_the_wrapped_network(tmp_path):
    dit = _tiny_dit()
    network = LoRANetwork(dit, rank=4, alpha=2.0, include_patterns=[r"blocks\.0\..*", r"blocks\.1\.ffn\.2"])
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.normal_(0, 0.2)
    path = tmp_path / "style.safetensors"
    save_lora(path, network.state_dict(), dtype="fp32")

    x, t, ctx = _inputs()
    with torch.no_grad():
        base_out = dit(x, t, ctx)
        network.set_multiplier(0.7)
        network.apply_to(dit)
        reference = dit(x, t, ctx)
        network.remove()

    fresh = copy.deepcopy(_tiny_dit())
    applied = apply_lora_file(fresh, path, multiplier=0.7)
    with torch.no_grad():
        merged = fresh(x, t, ctx)
    assert not torch.allclose(reference, base_out, atol=1e-4)
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)
    assert len(applied.lora_modules) == len(network.lora_modules)


def test_lora_for_another_model_is_a_user_error(tmp_path):
    dit = _tiny_dit()
    network = LoRANetwork(dit, rank=2, alpha=2.0)
    sd = {k.replace("blocks_1", "blocks_9"): v for k, v in network.state_dict().items()}
    path = tmp_path / "other.safetensors"
    save_lora(path, sd, dtype="fp32")
    with pytest.raises(UserError, match="do not exist in this DiT"):
        apply_lora_file(_tiny_dit(), path, multiplier=1.0)
    with pytest.raises(UserError, match="not found"):
        apply_lora_file(_tiny_dit(), tmp_path / "missing.safetensors", multiplier=1.0)


def test_fp8_base_keeps_the_lora_as_a_wrapper(tiny_kit, tmp_path):
    from wantrainer.models.wan.loading import load_wan_dit

    full = load_wan_dit(tiny_kit.dit_wan21, dtype=torch.float32).eval()
    network = LoRANetwork(full, rank=2, alpha=2.0)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.normal_(0, 0.2)
    path = tmp_path / "l.safetensors"
    save_lora(path, network.state_dict(), dtype="fp32")

    fp8 = load_wan_dit(tiny_kit.dit_wan21, dtype=torch.float32, fp8_base=True).eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), [torch.randn(3, 64, generator=g)]
    with torch.no_grad():
        base, full_base = fp8(x, t, ctx), full(x, t, ctx)
        applied = apply_lora_file(fp8, path, multiplier=1.0, device="cpu")
        with_lora = fp8(x, t, ctx)
        network.apply_to(full)
        reference = full(x, t, ctx)
    assert any(v.dtype == torch.float8_e4m3fn for v in fp8.state_dict().values())
    # the LoRA acts on the fp8 model as on the full-precision one (fp8 only rounds the base weights)
    lora_fp8, lora_full = with_lora - base, reference - full_base
    assert lora_full.abs().max() > 1e-2
    assert (lora_fp8 - lora_full).norm() < 0.2 * lora_full.norm()
    applied.remove()
    with torch.no_grad():
        torch.testing.assert_close(fp8(x, t, ctx), base)

