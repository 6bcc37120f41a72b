"""The tiny model kit: file names, layouts, dtypes, size, determinism, and that every file loads and runs."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wantrainer.devkit.tiny_kit import (
    COMFY_PREFIX,
    TINY_CLIP_TOKENS,
    TINY_DIT_CONFIG,
    TINY_DIT_VARIANTS,
    make_tiny_model_kit,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KIT_FILES = {
    "dit_wan21.safetensors",
    "dit_wan22_high_noise.safetensors",
    "dit_wan22_low_noise.safetensors",
    "dit_wan21_i2v.safetensors",
    "dit_wan21_flf2v.safetensors",
    "dit_wan22_i2v_high_noise.safetensors",
    "dit_wan22_i2v_low_noise.safetensors",
    "dit_wan22_ti2v.safetensors",
    "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "wan2.2_vae.safetensors",
    "wan_2.1_vae.safetensors",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer",
    "dinov2_tiny",
}


def _load_dit(path, config=TINY_DIT_CONFIG):
    """The kit file through the loader real checkpoints take; its config must be inferred as the kit's."""
    from wantrainer.models.wan.loading import load_wan_dit

    model = load_wan_dit(path, dtype=torch.float32)
    assert model.config == config
    state = load_file(str(path))
    assert all(k.startswith(COMFY_PREFIX) for k in state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[COMFY_PREFIX + key].float()), key
    return model


def test_kit_files_layouts_and_size(tiny_kit):
    assert {p.name for p in tiny_kit.root.iterdir()} == KIT_FILES
    total = sum(p.stat().st_size for p in tiny_kit.root.rglob("*") if p.is_file())
    assert total < 30 * 2**20, total
    assert (tiny_kit.tokenizer_dir / "spiece.model").is_file()
    assert {p.name for p in tiny_kit.dinov2.iterdir()} == {"config.json", "model.safetensors"}

    with safe_open(str(tiny_kit.dit_wan21), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.head.head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.diffusion_model.head.head.weight").abs().sum() > 0
    for key in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.weight", "blocks.1.ffn.2.weight",
                "patch_embedding.weight", "text_embedding.0.weight", "head.modulation"):
        assert COMFY_PREFIX + key in keys
    assert load_file(str(tiny_kit.dit_wan21))[COMFY_PREFIX + "text_embedding.0.weight"].shape == (128, 64)

    vae = load_file(str(tiny_kit.vae))
    for key in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.2.resample.1.weight",
                "encoder.downsamples.5.time_conv.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
                "conv1.weight", "conv2.weight", "decoder.conv1.weight", "decoder.upsamples.3.time_conv.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight", "decoder.head.0.gamma"):
        assert key in vae, key
    assert vae["encoder.conv1.weight"].shape == (16, 3, 3, 3, 3)
    assert all(v.dtype == torch.bfloat16 for v in vae.values())

    t5 = torch.load(str(tiny_kit.t5), weights_only=True)
    for key in ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.1.pos_embedding.embedding.weight",
                "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.1.ffn.fc2.weight",
                "blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight"):
        assert key in t5, key
    assert t5["token_embedding.weight"].shape[1] == 64 == TINY_DIT_CONFIG.text_dim
    assert len(t5) == 2 + 2 * 10


def test_kit_is_deterministic_and_seeded(tiny_kit, tmp_path):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model_kit.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model_kit", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "again"), "--seed", "0"]) == 0
    again = make_tiny_model_kit(tmp_path / "again", seed=0)  # rewriting in place is allowed
    for name in ("dit_wan21", "dit_wan22_high", "vae"):
        a, b = load_file(str(getattr(tiny_kit, name))), load_file(str(getattr(again, name)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_kit.tokenizer_dir / "spiece.model").read_bytes() == (again.tokenizer_dir / "spiece.model").read_bytes()
    t5a, t5b = torch.load(str(tiny_kit.t5), weights_only=True), torch.load(str(again.t5), weights_only=True)
    assert all(torch.equal(t5a[k], t5b[k]) for k in t5a)

    # the two wan22 experts and the wan21 model differ; another seed gives other weights
    high, low = load_file(str(tiny_kit.dit_wan22_high)), load_file(str(tiny_kit.dit_wan22_low))
    key = COMFY_PREFIX + "blocks.0.self_attn.q.weight"
    assert not torch.equal(high[key], low[key])
    other = make_tiny_model_kit(tmp_path / "other", seed=1)
    assert not torch.equal(load_file(str(other.dit_wan21))[key], load_file(str(tiny_kit.dit_wan21))[key])


def test_kit_models_run_together_and_gradients_reach_the_blocks(tiny_kit):
    from wantrainer.models.wan.text_encoder import WanTextEncoder
    from wantrainer.models.wan.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE.load(tiny_kit.vae)
    encoder = WanTextEncoder.load(tiny_kit.t5, tiny_kit.tokenizer_dir)
    latents = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    context = encoder.encode(["a red circle moving left on a blue background"])
    dit = _load_dit(tiny_kit.dit_wan21)
    out = dit(latents, torch.tensor([500.0]), context)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    grad = dit.blocks[0].self_attn.q.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, model_type",
    [("dit_wan21_i2v", "i2v"), ("dit_wan21_flf2v", "flf2v"), ("dit_wan22_i2v_high", "i2v_a14b"),
     ("dit_wan22_i2v_low", "i2v_a14b"), ("dit_wan22_ti2v", "ti2v")],
)  # fmt: skip
def test_kit_image_to_video_dits_load_as_their_variant_and_run(tiny_kit, name, model_type):
    dit = _load_dit(getattr(tiny_kit, name), TINY_DIT_VARIANTS[model_type])
    config = dit.config
    assert config.model_type == model_type
    keys = set(load_file(str(getattr(tiny_kit, name))))
    assert (COMFY_PREFIX + "blocks.1.cross_attn.k_img.weight" in keys) == (model_type in ("i2v", "flf2v"))
    assert (COMFY_PREFIX + "img_emb.emb_pos" in keys) == (model_type == "flf2v")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.out_dim, 2, 4, 4, generator=gen)
    y = torch.randn(1, config.condition_channels, 2, 4, 4, generator=gen) if config.condition_channels else None
    clip = torch.randn(1, config.clip_images * TINY_CLIP_TOKENS, 64, generator=gen) if config.image_dim else None
    out = dit(x, torch.tensor([500.0]), [torch.randn(5, 64, generator=gen)], clip_fea=clip, y=y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0.01
