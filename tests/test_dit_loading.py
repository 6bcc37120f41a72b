"""Loading Wan DiT checkpoints: layouts, prefixes, shards, dtypes, architecture inference, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from wantrainer.errors import UserError
from wantrainer.models.wan.configs import WAN_CONFIGS, WanModelConfig
from wantrainer.models.wan.loading import CheckpointMismatchError, infer_wan_config, load_wan_dit
from wantrainer.models.wan.transformer import WanModel

TINY = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return WanModel(TINY).eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    return (
        x,
        torch.tensor([100.0, 800.0]),
        [torch.randn(6, 64, generator=gen), torch.randn(11, 64, generator=gen)],
    )


def contiguous_sd(model, dtype=None, prefix=""):
    return {prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_fp32_file_loads_identical(tmp_path, tiny_model, inputs):
    save_file(contiguous_sd(tiny_model), tmp_path / "dit.safetensors")
    loaded = load_wan_dit(tmp_path / "dit.safetensors")
    assert loaded.config == TINY
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(run(loaded, inputs), run(tiny_model, inputs))


def test_bf16_comfyui_prefixed_matches_fp32_unprefixed(tmp_path, tiny_model, inputs):
    save_file(contiguous_sd(tiny_model), tmp_path / "fp32.safetensors")
    save_file(
        contiguous_sd(tiny_model, torch.bfloat16, "model.diffusion_model."), tmp_path / "bf16.safetensors"
    )
    fp32 = load_wan_dit(tmp_path / "fp32.safetensors", dtype=torch.float32)
    bf16 = load_wan_dit(tmp_path / "bf16.safetensors", dtype=torch.float32)  # upcast: no bf16 matmul on CPU
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.allclose(a, b, rtol=2**-8, atol=1e-6), name
    out32, out16 = run(fp32, inputs), run(bf16, inputs)
    rel = ((out32 - out16).norm() / out32.norm()).item()
    assert 0 < rel < 0.02  # bf16 rounding of the weights only


def test_dtype_rules(tmp_path, tiny_model):
    save_file(contiguous_sd(tiny_model, torch.bfloat16), tmp_path / "bf16.safetensors")
    kept = load_wan_dit(tmp_path / "bf16.safetensors")  # dtype None: as stored
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    save_file(contiguous_sd(tiny_model, torch.float16), tmp_path / "fp16.safetensors")
    assert {p.dtype for p in load_wan_dit(tmp_path / "fp16.safetensors").parameters()} == {torch.float16}
    cast = load_wan_dit(tmp_path / "bf16.safetensors", dtype=torch.float16)
    assert cast.dtype == torch.float16
    assert cast.blocks[0].ffn[0].weight.dtype == torch.float16
    assert cast.blocks[0].modulation.dtype == torch.float32
    assert cast.time_embedding[0].weight.dtype == torch.float32
    assert cast.blocks[1].self_attn.norm_q.weight.dtype == torch.float32


def test_sharded_with_index(tmp_path, tiny_model, inputs):
    sd = contiguous_sd(tiny_model, prefix="model.diffusion_model.")
    keys = sorted(sd)
    shards = {"dit-00001-of-00002.safetensors": keys[::2], "dit-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: sd[k] for k in shard_keys}, tmp_path / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "dit.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    want = run(tiny_model, inputs)
    for path in (
        tmp_path / "dit.safetensors.index.json",
        tmp_path / "dit-00001-of-00002.safetensors",
        tmp_path,
    ):
        assert torch.equal(run(load_wan_dit(path), inputs), want)


@pytest.mark.parametrize("name", sorted(WAN_CONFIGS))
def test_infer_released_sizes_from_shapes(name):
    config = WAN_CONFIGS[name]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}
    assert infer_wan_config(shapes) == config


def test_infer_wan22_ti2v_channels():
    config = TINY.with_(in_dim=48, out_dim=48, dim=256, num_heads=2)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}
    assert infer_wan_config(shapes) == config


def _expect_error(tmp_path, sd, *fragments):
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_wan_dit(tmp_path / "bad.safetensors")
    for fragment in fragments:
        assert fragment in str(err.value)
    assert isinstance(err.value, UserError)


def test_error_diffusers_layout(tmp_path, tiny_model):
    converted = convert_wan_transformer_to_diffusers(contiguous_sd(tiny_model))
    _expect_error(tmp_path, {k: v.contiguous() for k, v in converted.items()}, "diffusers-layout", "missing")


def test_error_lora(tmp_path):
    lora = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 128),
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(128, 4),
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
    }
    _expect_error(tmp_path, lora, "looks like a LoRA")


def test_error_vae_and_text_encoder(tmp_path):
    _expect_error(
        tmp_path, {"encoder.conv1.weight": torch.zeros(1), "decoder.conv1.weight": torch.zeros(1)}, "VAE"
    )
    _expect_error(
        tmp_path, {"shared.weight": torch.zeros(1), "encoder.block.0.x": torch.zeros(1)}, "text encoder"
    )


def test_error_missing_and_unexpected_keys(tmp_path, tiny_model):
    sd = contiguous_sd(tiny_model)
    del sd["blocks.1.cross_attn.k.weight"]
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    _expect_error(
        tmp_path, sd, "blocks.1.cross_attn.k.weight", "blocks.0.self_attn.extra.weight", "incomplete"
    )


def test_error_missing_file_and_pth(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_wan_dit(tmp_path / "nope.safetensors")
    (tmp_path / "dit.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors"):
        load_wan_dit(tmp_path / "dit.pth")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_loading_holds_about_one_copy_of_the_weights(tmp_path):
    import gc
    import threading
    import time

    config = WanModelConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=4, text_dim=256)
    model = WanModel(config)
    save_file(contiguous_sd(model), tmp_path / "dit.safetensors")
    size = (tmp_path / "dit.safetensors").stat().st_size
    del model
    gc.collect()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        loaded = load_wan_dit(tmp_path / "dit.safetensors")
        with torch.no_grad():  # touch every weight (memory-mapped pages become resident)
            total = sum(p.sum() for p in loaded.parameters())
    finally:
        done.set()
        thread.join()
    assert loaded.config == config and torch.isfinite(total)
    # resident memory grows by one copy of the weights (measured 1.0); building a model and then loading a
    # state dict into it would take two (measured 2.0)
    assert (peak[0] - base) / size < 1.35
