"""The I2V / FLF2V / Wan 2.2 I2V / TI2V-5B variants of our DiT against diffusers' WanTransformer3DModel configured
for them (image_dim + added k/v projections, pos_embed_seq_len, the 48-channel shape), fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from diffusers_support import TINY, diffusers_twin, padded_context
from wantrainer.models.wan.configs import WAN_CONFIGS, WanModelConfig, known_config_name
from wantrainer.models.wan.transformer import WanModel

I2V = TINY.with_(in_dim=36, image_dim=96)
FLF2V = TINY.with_(in_dim=36, image_dim=96, image_pos_len=2 * 9)
I2V_A14B = TINY.with_(in_dim=36)
TI2V = TINY.with_(in_dim=48, out_dim=48)


def _pair(config: WanModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = WanModel(config).eval()
    with torch.no_grad():  # random biases / norm weights / position embedding so that every parameter matters
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("emb_pos") or ".proj.0." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return ours, diffusers_twin(ours)


def _inputs(config: WanModelConfig, seed: int, frames: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.out_dim, frames, 8, 12, generator=gen)
    y = torch.randn(2, config.condition_channels, frames, 8, 12, generator=gen) if config.condition_channels else None
    context = [torch.randn(7, config.text_dim, generator=gen), torch.randn(19, config.text_dim, generator=gen)]
    clip = None
    if config.image_dim:  # per sample [frames x tokens, image_dim]; FLF2V: first and last frame, 9 tokens each
        clip = torch.randn(2, config.clip_images, 9, config.image_dim, generator=gen)
    return x, y, context, clip


def _diffusers(ref, x, y, t, context, clip):
    hidden = x if y is None else torch.cat([x, y], dim=1)  # the pipelines concatenate the condition
    image = None if clip is None else clip.flatten(0, 1)  # diffusers: [B x frames, tokens, image_dim]
    return ref(hidden, t, padded_context(context), encoder_hidden_states_image=image, return_dict=False)[0]


@pytest.mark.parametrize("config", [I2V, FLF2V, I2V_A14B], ids=["i2v", "flf2v", "i2v_a14b"])
def test_image_to_video_parity_with_diffusers(config):
    ours, ref = _pair(config)
    x, y, context, clip = _inputs(config, seed=1)
    with torch.no_grad():
        for t in ([1.0, 999.0], [250.0, 873.5]):
            timestep = torch.tensor(t)
            got = ours(x, timestep, context, clip_fea=clip, y=y)
            want = _diffusers(ref, x, y, timestep, context, clip)
            assert got.shape == want.shape == x.shape
            assert (got - want).abs().max().item() < 1e-5
            assert want.abs().max().item() > 0.1
        # every conditioning input matters: another image latent / CLIP feature changes the prediction
        base = ours(x, torch.tensor([500.0, 500.0]), context, clip_fea=clip, y=y)
        assert (ours(x, torch.tensor([500.0, 500.0]), context, clip_fea=clip, y=y + 1) - base).abs().max() > 1e-3
        if clip is not None:
            other = torch.randn(clip.shape, generator=torch.Generator().manual_seed(9))  # LayerNorm removes a shift
            moved = ours(x, torch.tensor([500.0, 500.0]), context, clip_fea=other, y=y)
            assert (moved - base).abs().max() > 1e-3


def test_flf2v_position_embedding_matters_and_is_the_diffusers_one():
    ours, ref = _pair(FLF2V, seed=4)
    x, y, context, clip = _inputs(FLF2V, seed=2)
    t = torch.tensor([400.0, 400.0])
    with torch.no_grad():
        with_pos = ours(x, t, context, clip_fea=clip, y=y)
        assert (with_pos - _diffusers(ref, x, y, t, context, clip)).abs().max() < 1e-5
        ours.img_emb.emb_pos.zero_()
        assert (ours(x, t, context, clip_fea=clip, y=y) - with_pos).abs().max() > 1e-3
        # first and last frame are told apart: swapping them changes the output
        ours, _ = _pair(FLF2V, seed=4)
        swapped = ours(x, t, context, clip_fea=clip.flip(1), y=y)
        assert (swapped - with_pos).abs().max() > 1e-3


def test_ti2v_5b_shape_per_token_parity_with_diffusers():
    """The TI2V-5B path: 48 channels, the first latent frame's tokens at timestep 0, the rest at t."""
    ours, ref = _pair(TI2V, seed=5)
    x, _, context, _ = _inputs(TI2V, seed=3)
    tokens_per_frame = (8 // 2) * (12 // 2)
    with torch.no_grad():
        for t in (999.0, 321.0):
            timestep = torch.full((2, 3 * tokens_per_frame), t)
            timestep[:, :tokens_per_frame] = 0.0
            got = ours(x, timestep, context)
            want = _diffusers(ref, x, None, timestep, context, None)
            assert got.shape == x.shape
            assert (got - want).abs().max().item() < 1e-5
            assert want.abs().max().item() > 0.1
            # the per-token timestep is used: it differs from the per-sample one
            assert (got - ours(x, torch.tensor([t, t]), context)).abs().max() > 1e-3


@pytest.mark.parametrize("config", [I2V, FLF2V, I2V_A14B, TI2V])
def test_conditioning_inputs_are_checked(config):
    model = WanModel(config).eval()
    x, y, context, clip = _inputs(config, seed=0, frames=1)
    t = torch.tensor([10.0, 10.0])
    if config.condition_channels:
        with pytest.raises(ValueError, match="needs conditioning y"):
            model(x, t, context, clip_fea=clip)
        with pytest.raises(ValueError, match="needs conditioning y"):
            model(x, t, context, clip_fea=clip, y=y[:, :4])
    else:
        with pytest.raises(ValueError, match="takes none"):
            model(x, t, context, y=torch.zeros(2, 20, 1, 8, 12))
    if config.image_dim:
        with pytest.raises(ValueError, match="needs CLIP features"):
            model(x, t, context, y=y)
    else:
        with pytest.raises(ValueError, match="no image branch"):
            model(x, t, context, clip_fea=torch.zeros(2, 9, 96), y=y)


def test_model_types_and_released_names():
    assert [c.model_type for c in (TINY, I2V, FLF2V, I2V_A14B, TI2V)] == ["t2v", "i2v", "flf2v", "i2v_a14b", "ti2v"]
    assert (I2V.condition_channels, TI2V.condition_channels, FLF2V.clip_images, I2V.clip_images) == (20, 0, 2, 1)
    assert known_config_name(WAN_CONFIGS["wan21_i2v_14b"]) == "wan21_i2v_14b"
    assert known_config_name(WAN_CONFIGS["wan21_flf2v_14b"]) == "wan21_flf2v_14b"
    assert known_config_name(WAN_CONFIGS["wan22_i2v_a14b"]) == "wan22_i2v_a14b"
    assert WAN_CONFIGS["wan22_ti2v_5b"].model_type == "ti2v"


def test_i2v_file_in_fp8_and_lora_targets_cover_the_image_projections(tiny_kit):
    from wantrainer.models.wan.fp8 import FP8Linear
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.networks.lora_wan import select_targets

    dit = load_wan_dit(tiny_kit.dit_wan21_i2v, dtype=torch.float32, fp8_base=True)
    assert isinstance(dit.blocks[0].cross_attn.k_img, FP8Linear)
    assert isinstance(dit.blocks[1].cross_attn.v_img, FP8Linear)
    targets = select_targets(dit, [], [])
    assert {"blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img"} <= set(targets)
    assert not any("img_emb" in t for t in targets)  # the image projection MLP is not a block Linear
    assert len(targets) == 2 * 12  # 4 self-attn + 6 cross-attn + 2 ffn per block


def test_model_type_is_read_from_the_checkpoint_header(tiny_kit):
    from wantrainer.models.wan.conditioning import dit_model_type

    assert dit_model_type(tiny_kit.dit_wan22_ti2v) == "ti2v"
    assert dit_model_type(tiny_kit.dit_wan21_flf2v) == "flf2v"
