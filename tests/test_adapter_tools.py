"""tools/merge_lora.py, inspect_lora.py and convert_lora.py on LoHa, LoKr and DoRA files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_adapters import ADAPTERS, build, inputs, randomise, tiny_dit
from test_lora_tools import tool
from wantrainer.networks.formats import load_lora, save_lora
from wantrainer.utils.atomic import save_safetensors_atomic


@pytest.fixture(scope="module", params=["loha_dora", "lokr_decomposed", "dora"])
def adapter_file(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    dit = tiny_dit()
    dit_path = root / "dit.safetensors"
    save_safetensors_atomic({"model.diffusion_model." + k: v for k, v in dit.state_dict().items()}, dit_path)
    network = build(dit, request.param)
    randomise(network)
    path = root / "adapter.safetensors"
    save_lora(path, network.state_dict(), {"ss_network_module": ADAPTERS[request.param][0]}, dtype="fp32")
    network.set_multiplier(0.7)
    network.apply_to(dit)
    with torch.no_grad():
        want = dit(*inputs())
    return {"name": request.param, "root": root, "dit": dit_path, "path": path, "want_0.7": want}


def test_merge_gives_the_adapted_model(adapter_file):
    out = adapter_file["root"] / "merged.safetensors"
    assert tool("merge_lora").main(["--dit", str(adapter_file["dit"]), "--lora", str(adapter_file["path"]),
                                    "--multiplier", "0.7", "--out", str(out)]) == 0
    merged = tiny_dit(seed=5)
    merged.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(out)).items()})
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs()), adapter_file["want_0.7"], rtol=1e-4, atol=2e-5)


def test_inspect_names_the_type(adapter_file, capsys):
    assert tool("inspect_lora").main([str(adapter_file["path"]), "--modules"]) == 0
    out = capsys.readouterr().out
    kind = {"loha_dora": "loha+dora", "lokr_decomposed": "lokr", "dora": "lora+dora"}[adapter_file["name"]]
    assert f"type:     {kind}\n" in out and "modules:  20 " in out and "zero modules 0" in out
    assert "blocks.1.ffn.2" in out


def test_convert_to_comfyui_layout_and_back(adapter_file, capsys):
    convert = tool("convert_lora")
    comfy = adapter_file["root"] / "comfy.safetensors"
    assert convert.main([str(adapter_file["path"]), str(comfy), "--to", "diffusion_model", "--dtype", "bf16"]) == 0
    raw = load_file(str(comfy))
    assert all(k.startswith("diffusion_model.blocks.") for k in raw)
    assert all(v.dtype == torch.float32 for k, v in raw.items() if k.endswith((".alpha", ".dora_scale")))
    back, _ = load_lora(comfy)
    original, _ = load_lora(adapter_file["path"])
    assert back.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(back[key].float(), original[key], rtol=1e-2, atol=1e-2)
    capsys.readouterr()
    assert convert.main([str(adapter_file["path"]), str(adapter_file["root"] / "d.safetensors"),
                         "--to", "diffusers"]) == 2
    assert "plain LoRA only" in capsys.readouterr().err
