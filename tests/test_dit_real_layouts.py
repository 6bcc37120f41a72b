"""The DiT loader against the released file layouts, written from the Wan reference (wan/modules/model.py) and
ComfyUI's file formats, not from our model: key names, shapes, variants, scaled-fp8 files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wantrainer.models.wan.configs import WAN_CONFIGS, WanModelConfig
from wantrainer.models.wan.loading import CheckpointMismatchError, infer_wan_config, load_wan_dit
from wantrainer.models.wan.transformer import WanModel


def reference_shapes(dim, ffn_dim, num_layers, in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                     i2v=False, flf2v=False) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Every tensor of a Wan reference ``WanModel`` (qk_norm and cross_attn_norm on, as in all released
    configs; norm1 / norm2 / head.norm have no affine parameters; ``freqs`` is a plain attribute, not saved)."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (out_dim * 4, dim), "head.head.bias": (out_dim * 4,),
        "head.modulation": (1, 2, dim),
    }  # fmt: skip
    for n in range(num_layers):
        block = f"blocks.{n}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{block}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{block}{attn}.{proj}.bias"] = (dim,)
            shapes[f"{block}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{block}{attn}.norm_k.weight"] = (dim,)
        if i2v:  # WanI2VCrossAttention
            for proj in ("k_img", "v_img"):
                shapes[f"{block}cross_attn.{proj}.weight"] = (dim, dim)
                shapes[f"{block}cross_attn.{proj}.bias"] = (dim,)
            shapes[f"{block}cross_attn.norm_k_img.weight"] = (dim,)
        shapes[f"{block}norm3.weight"] = (dim,)
        shapes[f"{block}norm3.bias"] = (dim,)
        shapes[f"{block}ffn.0.weight"] = (ffn_dim, dim)
        shapes[f"{block}ffn.0.bias"] = (ffn_dim,)
        shapes[f"{block}ffn.2.weight"] = (dim, ffn_dim)
        shapes[f"{block}ffn.2.bias"] = (dim,)
        shapes[f"{block}modulation"] = (1, 6, dim)
    if i2v:  # MLPProj: LayerNorm(1280), Linear(1280, 1280), GELU, Linear(1280, dim), LayerNorm(dim)
        shapes.update({
            "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
            "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
            "img_emb.proj.3.weight": (dim, 1280), "img_emb.proj.3.bias": (dim,),
            "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,),
        })  # fmt: skip
    if flf2v:  # MLPProj(flf_pos_emb=True): emb_pos [1, FIRST_LAST_FRAME_CONTEXT_TOKEN_NUMBER = 257 * 2, 1280]
        shapes["img_emb.emb_pos"] = (1, 514, 1280)
    return shapes


# the released sizes (Wan configs wan_t2v_1_3B / wan_t2v_14B / Wan 2.2 t2v_A14B experts / ti2v_5B)
RELEASED = {
    "wan21_t2v_1.3b": dict(dim=1536, ffn_dim=8960, num_layers=30),
    "wan21_t2v_14b": dict(dim=5120, ffn_dim=13824, num_layers=40),
    "wan22_t2v_a14b": dict(dim=5120, ffn_dim=13824, num_layers=40),
    "wan22_ti2v_5b": dict(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48),
    "wan21_i2v_14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, i2v=True),
    "wan21_flf2v_14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, i2v=True, flf2v=True),
    "wan22_i2v_a14b": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36),
}
HEADS = {"wan21_t2v_1.3b": 12, "wan21_t2v_14b": 40, "wan22_t2v_a14b": 40, "wan22_ti2v_5b": 24,
         "wan21_i2v_14b": 40, "wan21_flf2v_14b": 40, "wan22_i2v_a14b": 40}  # fmt: skip
TYPES = {"wan21_t2v_1.3b": "t2v", "wan21_t2v_14b": "t2v", "wan22_t2v_a14b": "t2v", "wan22_ti2v_5b": "ti2v",
         "wan21_i2v_14b": "i2v", "wan21_flf2v_14b": "flf2v", "wan22_i2v_a14b": "i2v_a14b"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_layouts_infer_the_named_config_and_match_our_model(name):
    shapes = reference_shapes(**RELEASED[name])
    config = infer_wan_config(shapes)
    assert config == WAN_CONFIGS[name]
    assert config.num_heads == HEADS[name]
    assert config.model_type == TYPES[name]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}
    assert ours == shapes


TINY = dict(dim=128, ffn_dim=256, num_layers=2, text_dim=64)


def _save_zeros(path, shapes, prefix=""):
    save_file({prefix + k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, str(path))


@pytest.mark.parametrize(
    "extra, model_type",
    [
        (dict(in_dim=36), "i2v_a14b"),  # Wan 2.2 I2V A14B: no image keys, 36 input channels
        (dict(in_dim=36, i2v=True), "i2v"),  # Wan 2.1 I2V
        (dict(in_dim=36, i2v=True, flf2v=True), "flf2v"),  # Wan 2.1 FLF2V
        (dict(in_dim=48, out_dim=48), "ti2v"),
    ],
)
def test_image_to_video_and_ti2v_files_load_as_their_variant(tmp_path, extra, model_type):
    shapes = reference_shapes(**TINY, **extra)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, str(tmp_path / "dit.safetensors"))
    model = load_wan_dit(tmp_path / "dit.safetensors")
    assert model.config.model_type == model_type
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_unknown_channel_layouts_are_refused(tmp_path):
    _save_zeros(tmp_path / "dit.safetensors", reference_shapes(**TINY, in_dim=32), "model.diffusion_model.")
    with pytest.raises(CheckpointMismatchError, match="32 input / 16 output channels.*I2V and FLF2V"):
        load_wan_dit(tmp_path / "dit.safetensors")


# ----- ComfyUI scaled fp8 -----------------------------------------------------------------------------------
BLOCK_LINEARS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + ("ffn.0", "ffn.2")


def _random_reference_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in reference_shapes(**TINY).items()}


def _scaled_fp8_file(state, new_format: bool):
    """What ComfyUI writes: fp8 block Linear weights with a per-tensor float32 scale; either the
    ``scaled_fp8`` marker + ``scale_weight`` / ``scale_input`` or ``weight_scale`` + ``comfy_quant`` /
    ``input_scale``. Returns (file dict, the dequantised float32 weights)."""
    out = {} if new_format else {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    dequantised = dict(state)
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if not (key.endswith(".weight") and layer.split(".", 2)[-1] in BLOCK_LINEARS):
            out[key] = value.to(torch.bfloat16)
            dequantised[key] = out[key].float()
            continue
        scale = value.abs().max() / 448.0
        weight = (value / scale).to(torch.float8_e4m3fn)
        out[key] = weight
        dequantised[key] = weight.float() * scale
        if new_format:
            out[layer + ".weight_scale"] = scale.reshape(())
            out[layer + ".input_scale"] = torch.tensor(0.5)
            out[layer + ".comfy_quant"] = torch.tensor(
                list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
            )
        else:
            out[layer + ".scale_weight"] = scale.reshape(())
            out[layer + ".scale_input"] = torch.tensor(1.0)
    return out, dequantised


def _run(model):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 1, 4, 4, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), [torch.randn(5, 64, generator=gen)])


@pytest.mark.parametrize("new_format", [False, True], ids=["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_files_load_dequantised(tmp_path, new_format):
    stored, dequantised = _scaled_fp8_file(_random_reference_state(), new_format)
    save_file(stored, str(tmp_path / "dit_fp8_scaled.safetensors"))
    reference = WanModel(WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64))
    reference.load_state_dict(dequantised)
    loaded = load_wan_dit(tmp_path / "dit_fp8_scaled.safetensors", dtype=torch.float32)
    assert torch.allclose(_run(loaded), _run(reference), rtol=1e-5, atol=1e-6)
    # kept as stored: the same fp8 values, with their scales
    as_stored = load_wan_dit(tmp_path / "dit_fp8_scaled.safetensors")
    ffn = as_stored.blocks[0].ffn[0]
    assert torch.equal(ffn.weight.view(torch.uint8), stored["blocks.0.ffn.0.weight"].view(torch.uint8))
    assert torch.equal(ffn.dequantized_weight(torch.float32), dequantised["blocks.0.ffn.0.weight"])
    assert as_stored.text_embedding[0].weight.dtype == torch.bfloat16  # as stored
    as_stored.to_compute_dtype(torch.float32)
    assert torch.allclose(_run(as_stored), _run(reference), rtol=1e-5, atol=1e-6)


def test_scaled_fp8_embeddings_and_head_load_in_the_dtype_of_an_fp8_file(tmp_path):
    """Layers outside the blocks may be scaled fp8 too; kept as stored they become bfloat16 like the rest."""
    state = _random_reference_state()
    stored, _ = _scaled_fp8_file(state, new_format=False)
    for layer in ("text_embedding.0", "time_projection.1", "head.head"):
        scale = state[layer + ".weight"].abs().max() / 448.0
        stored[layer + ".weight"] = (state[layer + ".weight"] / scale).to(torch.float8_e4m3fn)
        stored[layer + ".scale_weight"] = scale.reshape(())
    save_file(stored, str(tmp_path / "dit_fp8_scaled.safetensors"))
    model = load_wan_dit(tmp_path / "dit_fp8_scaled.safetensors")
    assert model.text_embedding[0].weight.dtype == model.head.head.weight.dtype == torch.bfloat16
    assert model.time_projection[1].weight.dtype == torch.bfloat16


def test_other_quantised_formats_are_refused_clearly(tmp_path):
    stored, _ = _scaled_fp8_file(_random_reference_state(), new_format=True)
    key = "blocks.0.ffn.0.weight"  # an nvfp4 layer: two 4-bit values per byte, block scales
    stored[key] = torch.zeros(256, 64, dtype=torch.uint8)
    stored["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                        dtype=torch.uint8)  # fmt: skip
    save_file(stored, str(tmp_path / "dit_nvfp4.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="blocks.0.ffn.0.weight is stored as U8.*nvfp4"):
        load_wan_dit(tmp_path / "dit_nvfp4.safetensors")
