"""LoHa, LoKr and DoRA: the saved files, applied with ComfyUI's weight-adapter formulas, give our model's output.

``comfy_weight`` is written from the formulas ComfyUI documents in ``comfy/weight_adapter/`` (loha.py, lokr.py,
lora.py and base.weight_decompose), working on the raw file tensors and the DiT's state dict the way ComfyUI maps
``lora_unet_<path with _>`` names to weights; it shares no code with ``wantrainer.networks``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from wantrainer.config.training import NetworkConfig
from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WanModelConfig
from wantrainer.models.wan.transformer import WanModel
from wantrainer.networks.formats import from_kohya, load_lora, save_lora, to_kohya
from wantrainer.networks.lora_wan import LoRANetwork, create_network

TINY = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)

ADAPTERS = {  # id -> (network_module, network_args, network_dim, the tensor names each module must save)
    "loha": ("lycoris.kohya", ["algo=loha"], 4, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "lokr_decomposed": ("lycoris.kohya", ["algo=lokr", "factor=4"], 2, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "lokr_full": ("lycoris.kohya", ["algo=lokr"], 32, {"lokr_w1", "lokr_w2", "alpha"}),
    "dora": ("networks.lora_wan", ["dora_wd=True"], 4, {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}),
    "loha_dora": ("lycoris.kohya", ["algo=loha", "dora_wd=True"], 4,
                  {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "dora_scale", "alpha"}),
    "lokr_dora": ("lycoris.kohya", ["algo=lokr", "factor=8", "dora_wd=True"], 2,
                  {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "dora_scale", "alpha"}),
}


def tiny_dit(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    return WanModel(TINY).eval()


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 1, 4, 4, generator=gen)
    context = [torch.randn(5, 64, generator=gen), torch.randn(3, 64, generator=gen)]
    return x, torch.tensor([300.0, 700.0]), context


def build(dit, adapter: str, alpha: float = 2.0) -> LoRANetwork:
    module, args, dim, _ = ADAPTERS[adapter]
    return create_network(NetworkConfig(network_module=module, network_args=args, network_dim=dim,
                                        network_alpha=alpha), dit)


@torch.no_grad()
def randomise(network: LoRANetwork, seed: int = 3, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in network.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("dora_scale"):
            p.mul_(1 + 0.1 * noise)
        else:
            p.copy_(noise * std)


# -- ComfyUI's formulas, on the file's tensors ----------------------------------------------------------------


def comfy_weight(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """The patched weight (ComfyUI: lora.py / loha.py / lokr.py calculate_weight and weight_decompose)."""
    weight = weight.float().clone()
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        diff, a = up @ down, (alpha / down.shape[0] if alpha is not None else 1.0)
    elif "hada_w1_a" in t:
        m1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
        m2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
        diff, a = m1 * m2, (alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0)
    else:
        dim = None
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].float()
        else:
            dim = t["lokr_w2_b"].shape[0]
            w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        a = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(t["lokr_w1"].float(), w2).reshape(weight.shape)
    if "dora_scale" not in t:
        return weight + strength * a * diff
    calc = weight + diff * a
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(calc.shape[1], 1).transpose(0, 1)
    calc = calc * (t["dora_scale"].float() / norm)
    return weight + strength * (calc - weight) if strength != 1.0 else calc


def comfy_patch(model_sd: dict[str, torch.Tensor], lora_sd: dict[str, torch.Tensor], strength: float):
    """Patch every weight that the file names (``lora_unet_`` + the weight's path with ``_``)."""
    key_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in model_sd if k.endswith(".weight")}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora_sd.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    patched = dict(model_sd)
    for name, tensors in groups.items():
        target = key_map[name]
        patched[target] = comfy_weight(model_sd[target], tensors, strength).to(model_sd[target].dtype)
    return patched, len(groups)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_saved_file_applied_with_comfyui_math_matches_our_model(adapter, strength, tmp_path):
    dit = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = dit(x, t, ctx)
    network = build(dit, adapter)
    network.apply_to(dit)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, ctx), base, rtol=0, atol=1e-5)  # dW = 0 at the start
    randomise(network)
    network.set_multiplier(strength)
    with torch.no_grad():
        ours = dit(x, t, ctx)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    path = tmp_path / "adapter.safetensors"
    save_lora(path, network.state_dict(), dtype="fp32")
    raw = load_file(str(path))
    assert {k.partition(".")[2] for k in raw} == ADAPTERS[adapter][3]
    assert all(v.dtype == torch.float32 for k, v in raw.items() if k.endswith((".alpha", ".dora_scale")))
    reference = tiny_dit()
    patched, count = comfy_patch(reference.state_dict(), raw, strength)
    assert count == len(network.lora_modules) == 20
    reference.load_state_dict(patched)
    with torch.no_grad():
        torch.testing.assert_close(reference(x, t, ctx), ours, rtol=1e-4, atol=2e-5)
    # merging into the weights gives the same model; the file read back gives the same network
    merged = tiny_dit()
    loaded = LoRANetwork.from_state_dict(merged, load_lora(path)[0], multiplier=strength)
    loaded.merge_to(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, ctx), ours, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("adapter", ["lokr_dora", "loha"])
def test_fp8_scaled_dit_with_block_swap(adapter, tmp_path):
    """On an fp8-scaled DiT with block swap the adapter acts on the dequantised weights (ComfyUI's math on them)."""
    from wantrainer.models.wan.fp8 import FP8Linear
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.utils.atomic import save_safetensors_atomic

    path = tmp_path / "dit.safetensors"
    save_safetensors_atomic(tiny_dit().state_dict(), path)
    dit = load_wan_dit(path, dtype=torch.float32, fp8_base=True, fp8_scaled=True)
    assert isinstance(dit.blocks[0].ffn[0], FP8Linear)
    dense = tiny_dit().state_dict()
    for name, module in dit.named_modules():
        if isinstance(module, FP8Linear):
            dense[f"{name}.weight"] = module.dequantized_weight(torch.float32)
    network = build(dit, adapter)
    randomise(network)
    network.apply_to(dit)
    dit.enable_block_swap(1, "cpu")
    dit.move_to_device_except_swap_blocks("cpu")
    dit.prepare_block_swap_before_forward()
    x, t, ctx = inputs()
    ours = dit(x, t, ctx)
    ours.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    file = tmp_path / "adapter.safetensors"
    save_lora(file, network.state_dict(), dtype="fp32")
    reference = tiny_dit()
    reference.load_state_dict(comfy_patch(dense, load_file(str(file)), 1.0)[0])
    with torch.no_grad():
        torch.testing.assert_close(reference(x, t, ctx), ours.detach(), rtol=1e-4, atol=2e-5)


def test_base_frozen_and_only_adapter_tensors_train():
    dit = tiny_dit()
    network = build(dit, "lokr_dora")
    network.apply_to(dit)
    randomise(network)
    x, t, ctx = inputs()
    dit(x, t, ctx).square().mean().backward()
    assert all(p.grad is None for p in dit.parameters())
    params = network.prepare_optimizer_params(1e-3)[0]["params"]
    assert {id(p) for p in params} == {id(p) for p in network.parameters()}
    assert all(p.grad is not None for p in params)


def test_lokr_factorisation_and_scale():
    dit = tiny_dit()
    decomposed = build(dit, "lokr_decomposed").lora_modules
    q, ffn_in = decomposed[0], decomposed[8]  # blocks.0.self_attn.q [128, 128], blocks.0.ffn.0 [256, 128]
    assert tuple(q.lokr_w1.shape) == (4, 4) and tuple(q.lokr_w2_a.shape) == (32, 2)
    assert tuple(q.lokr_w2_b.shape) == (2, 32) and q.scale == pytest.approx(1.0)  # alpha 2 / rank 2
    assert tuple(ffn_in.lokr_w1.shape) == (4, 4) and tuple(ffn_in.lokr_w2_a.shape) == (64, 2)
    full = build(dit, "lokr_full").lora_modules[0]
    assert tuple(full.lokr_w1.shape) == (8, 8) and tuple(full.lokr_w2.shape) == (16, 16) and full.scale == 1.0
    assert full.scaled_delta().abs().sum() == 0


def test_formats_keep_the_adapter_names(tmp_path):
    dit = tiny_dit()
    network = build(dit, "loha_dora")
    randomise(network)
    sd = network.state_dict()
    comfy = from_kohya(sd, "diffusion_model")
    assert "diffusion_model.blocks.0.self_attn.q.hada_w1_a" in comfy
    assert "diffusion_model.blocks.1.ffn.2.dora_scale" in comfy and "diffusion_model.blocks.0.ffn.0.alpha" in comfy
    back = to_kohya(comfy)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(UserError, match="diffusers' Wan loader reads plain LoRA only"):
        from_kohya(sd, "diffusers")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"network_module": "lycoris.kohya", "network_args": ["algo=boft"]}, "algo = 'boft' is not available"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "conv_dim=4"]}, "convolution layers"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "factor=4"]}, "LoKr options"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=0"]}, "positive integer"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "loraplus_lr_ratio": 4.0},
         "loraplus_lr_ratio"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr"], "use_rslora": True}, "use_rslora"),
        ({"network_args": ["dora_wd=True"], "network_dropout": 0.1}, "network_dropout"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "rank_dropout": 0.1}, "rank_dropout"),
        ({"network_args": ["dora_wd=maybe"]}, "True or False"),
        ({"network_module": "networks.lycoris"}, "not available"),
        ({"network_args": ["algo=loha"]}, "is not one of"),
    ],
)
def test_validate_refuses_what_train_refuses(values, message, tmp_path):
    """The config check and ``create_network`` (what train calls) give the same message for the same mistake."""
    from wantrainer.config_parser import parse_config
    from wantrainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config(values)
    with pytest.raises(UserError, match=message):
        create_network(NetworkConfig(**values), tiny_dit())


def test_users_spellings_are_accepted():
    from wantrainer.networks.args import parse_network_args

    spec = parse_network_args("lycoris.kohya", ["algo=lokr", "factor=8", "dora_wd=True", "full_matrix=False"])
    assert (spec.algo, spec.factor, spec.dora_wd, spec.full_matrix) == ("lokr", 8, True, False)
    assert parse_network_args("lycoris.kohya", ["algo='loha'"]).algo == "loha"
    assert parse_network_args("lycoris.kohya", ["algo=locon"]).algo == "lora"
    assert parse_network_args("networks.lora", ["dora_wd=true"]).dora_wd


def test_regex_escapes_in_network_args_are_kept_without_a_warning():
    import warnings

    from wantrainer.networks.args import parse_network_args

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_network_args("networks.lora_wan", ["include_patterns=['blocks\\.([0-9]|1[0-9])\\..*']"])
    assert spec.include_patterns == ["blocks\\.([0-9]|1[0-9])\\..*"]
