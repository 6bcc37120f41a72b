"""tools/inspect_lora.py, convert_lora.py and merge_lora.py on real tiny models and files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from wantrainer.config.training import NetworkConfig
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.formats import build_lora_metadata, load_lora, read_safetensors, save_lora
from wantrainer.networks.lora_wan import create_network
from wantrainer.utils.atomic import save_safetensors_atomic

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TINY = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    dit = WanModel(TINY).eval()
    dit_path = root / "dit.safetensors"
    save_safetensors_atomic({"model.diffusion_model." + k: v for k, v in dit.state_dict().items()}, dit_path)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=2.0), dit)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.05)
    meta = build_lora_metadata(
        config_toml='output_name = "x"\n', network={"network_dim": 4, "network_alpha": 2.0}, steps=10, epochs=1,
        target_model="wan21", base_model=dit_path, title="tiny", resolution=(64, 48),
    )
    lora_path = root / "lora.safetensors"
    save_lora(lora_path, network.state_dict(), meta, dtype="fp32")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen)
    t, ctx = torch.tensor([400.0]), [torch.randn(5, 64, generator=gen)]
    network.apply_to(dit)
    with torch.no_grad():
        want = dit(x, t, ctx)
    network.remove()
    return {"root": root, "dit_path": dit_path, "lora_path": lora_path, "inputs": (x, t, ctx), "want": want, "dit": dit}


def test_metadata_fields(setup):
    _, meta = read_safetensors(setup["lora_path"])
    assert meta["modelspec.architecture"] == "wan2.1/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.resolution"] == "64x48" and meta["modelspec.timestep_range"] == "0,1000"
    assert meta["ss_base_model_name"] == "dit.safetensors" and meta["ss_base_model_hash"].startswith("0x")
    assert len(meta["ss_base_model_hash"]) == 2 + 64 and meta["ss_network_dim"] == "4"
    assert meta["ss_config_toml"] == 'output_name = "x"\n' and meta["modelspec.date"].startswith("20")
    wan22 = build_lora_metadata(config_toml="", network={}, steps=1, epochs=0, target_model="wan22")
    assert wan22["modelspec.architecture"] == "wan2.2/lora"
    assert all(isinstance(v, str) for v in wan22.values())


def test_inspect(setup, capsys):
    assert tool("inspect_lora").main([str(setup["lora_path"])]) == 0
    out = capsys.readouterr().out
    assert "layout:   kohya" in out and "modules:  20 (60 tensors)" in out and "rank:     4 x20" in out
    assert "alpha:    2 x20" in out and "self_attn.q x2" in out and "zero modules 0" in out
    assert "modelspec.architecture = wan2.1/lora" in out
    assert tool("inspect_lora").main([str(setup["root"] / "missing.safetensors")]) == 2


def test_convert_roundtrip(setup, capsys):
    convert = tool("convert_lora")
    src = setup["lora_path"]
    for layout in ("diffusion_model", "diffusers"):
        out = setup["root"] / f"{layout}.safetensors"
        assert convert.main([str(src), str(out), "--to", layout]) == 0
        raw, meta = read_safetensors(out)
        assert meta["modelspec.title"] == "tiny"
        prefix = "diffusion_model.blocks.0.self_attn.q" if layout == "diffusion_model" else "transformer.blocks.0.attn1.to_q"
        assert f"{prefix}.lora_A.weight" in raw
        back = setup["root"] / f"{layout}_back.safetensors"
        assert convert.main([str(out), str(back), "--to", "kohya", "--dtype", "bf16"]) == 0
        a, _ = load_lora(src)
        b, _ = load_lora(back)
        name = "lora_unet_blocks_1_cross_attn_v"
        assert b[f"{name}.lora_up.weight"].dtype == torch.bfloat16
        delta_a = a[f"{name}.lora_up.weight"] @ a[f"{name}.lora_down.weight"] * (a[f"{name}.alpha"] / 4)
        delta_b = b[f"{name}.lora_up.weight"].float() @ b[f"{name}.lora_down.weight"].float() * (b[f"{name}.alpha"] / 4)
        torch.testing.assert_close(delta_b, delta_a, atol=2e-4, rtol=2e-2)
    assert "layout diffusers" in capsys.readouterr().out


def test_merge_matches_lora_forward(setup):
    merge = tool("merge_lora")
    out = setup["root"] / "merged.safetensors"
    rc = merge.main(["--dit", str(setup["dit_path"]), "--lora", str(setup["lora_path"]), "--out", str(out)])
    assert rc == 0
    merged, _ = read_safetensors(out)
    assert all(k.startswith("model.diffusion_model.") for k in merged)
    model = WanModel(TINY).eval()
    model.load_state_dict({k[len("model.diffusion_model.") :]: v for k, v in merged.items()})
    with torch.no_grad():
        got = model(*setup["inputs"])
        base = setup["dit"](*setup["inputs"])
    assert (got - base).abs().max().item() > 1e-2
    assert (got - setup["want"]).abs().max().item() < 1e-5
    # the same LoRA twice at 0.5 each equals once at 1.0
    twice = setup["root"] / "twice.safetensors"
    lora = str(setup["lora_path"])
    args = ["--dit", str(setup["dit_path"]), "--lora", lora, "--lora", lora, "--multiplier", "0.5", "--out", str(twice)]
    assert merge.main(args) == 0
    twice_sd, _ = read_safetensors(twice)
    key = "model.diffusion_model.blocks.0.ffn.0.weight"
    torch.testing.assert_close(twice_sd[key], merged[key])


def test_merge_errors(setup, tmp_path):
    merge = tool("merge_lora")
    bad_multipliers = ["--dit", str(setup["dit_path"]), "--lora", str(setup["lora_path"]), "--multiplier", "1",
                       "--multiplier", "2", "--out", str(tmp_path / "x.safetensors")]  # fmt: skip
    assert merge.main(bad_multipliers) == 2
    other = WanModelConfig(dim=256, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64)
    other_path = tmp_path / "other.safetensors"
    save_safetensors_atomic(WanModel(other).state_dict(), other_path)
    assert merge.main(["--dit", str(other_path), "--lora", str(setup["lora_path"]), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
