"""Image-to-video: caches with the conditioning (mask + image latents, CLIP features) in musubi-tuner's layout,
their interchange with musubi, wrong-type caches, and training the Wan 2.1 I2V / FLF2V and Wan 2.2 I2V models."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train_support import load, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.dataset.cache_format import cache_model_type, load_conditioning, load_latent_cache
from wantrainer.errors import UserError
from wantrainer.models.wan.conditioning import cache_compatible, condition_mask, condition_pixels

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _cache_files(folder):
    return sorted(folder.glob("*_wan.safetensors"))


@pytest.mark.parametrize("model_type", ["i2v", "flf2v", "i2v_a14b"])
def test_caches_hold_the_reference_conditioning(i2v_workspace, model_type):
    from wantrainer.models.wan.clip_vision import WanCLIPVision
    from wantrainer.models.wan.vae import WanVAE

    files = _cache_files(i2v_workspace.cache_dir(model_type))
    assert files
    with safe_open(str(files[0]), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["model_type"] == model_type
    latents, meta = load_latent_cache(files[0])
    assert latents.shape == (16, 2, 8, 8)
    assert f"latents_image_2x8x8_{'float32'}" in keys
    assert ("clip_float32" in keys) == (model_type != "i2v_a14b")
    kinds = ("image", "clip") if model_type != "i2v_a14b" else ("image",)
    cond = load_conditioning(files[0], kinds)
    y = cond["image"]
    assert y.shape == (20, 2, 8, 8)
    # the mask: the first latent frame (4 pixel frames: the first repeated) is the image; FLF2V also the last
    last = model_type == "flf2v"
    assert torch.equal(y[:4], condition_mask(5, 8, 8, last))
    assert torch.equal(y[:4, 0], torch.ones(4, 8, 8))
    assert y[:4, 1].tolist() == condition_mask(5, 8, 8, last)[:, 1].tolist()
    assert (y[3, 1].mean().item() == 1.0) == last and y[0, 1].mean().item() == 0.0
    # the image latents: the VAE encoding of the window with the other frames black (recomputed here)
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.sources import scan_dataset
    from wantrainer.dataset.windows import window_pixels

    cfg = load(write_config(i2v_workspace.root / "probe.toml", i2v_workspace.config(model_type, i2v_workspace.root)))
    item = next(i for i in scan_dataset(resolve_datasets(cfg.datasets, "train")[0]).items
                if i.latent_cache_path == files[0])  # fmt: skip
    _, pixels = next(iter(window_pixels([item])))
    vae = WanVAE.load(i2v_workspace.kit.vae)
    want = vae.encode(condition_pixels(pixels[None], last))[0]
    assert (y[4:] - want).abs().max().item() < 1e-4
    assert (y[4:, 0] - latents[:, 0]).abs().max().item() < 1e-4  # the first frame encodes alone (causal VAE)
    assert (y[4:, 1] - latents[:, 1]).abs().max().item() > 1e-2
    if "clip" in kinds:
        clip = WanCLIPVision.load(i2v_workspace.kit.clip)
        frames = [pixels[:, 0], pixels[:, -1]] if last else [pixels[:, 0]]
        want_clip = torch.stack([clip.encode(f[None])[0] for f in frames]) if last else clip.encode(frames[0][None])[0]
        assert cond["clip"].shape == want_clip.shape == ((2, 17, 64) if last else (17, 64))
        assert (cond["clip"] - want_clip).abs().max().item() < 1e-5


def test_musubi_i2v_cache_layout_both_ways(i2v_workspace, tmp_path):
    """A cache written as musubi-tuner's save_latent_cache_wan does (bf16 latents, fp16 CLIP named by the latents'
    dtype, no model_type metadata) is typed and read by us; ours carry the tensor names musubi looks up."""
    latents = torch.randn(16, 2, 8, 8).to(torch.bfloat16)
    y = torch.cat([condition_mask(5, 8, 8, False), torch.randn(16, 2, 8, 8)]).to(torch.bfloat16)
    clip = torch.randn(257, 1280).to(torch.float16)
    meta = {"architecture": "wan", "width": "64", "height": "64", "format_version": "1.0.1", "frame_count": "5"}
    path = tmp_path / "clip_00000-005_0064x0064_wan.safetensors"
    save_file({"latents_2x8x8_bfloat16": latents, "latents_image_2x8x8_bfloat16": y, "clip_bfloat16": clip},
              str(path), metadata=meta)
    assert cache_model_type(path) == "i2v"
    cond = load_conditioning(path, ("image", "clip"))
    assert torch.equal(cond["image"], y) and torch.equal(cond["clip"], clip)
    save_file({"latents_2x8x8_bfloat16": latents, "latents_image_2x8x8_bfloat16": y}, str(path), metadata=meta)
    assert cache_model_type(path) == "i2v_a14b"
    save_file({"latents_2x8x8_bfloat16": latents}, str(path), metadata=meta)
    assert cache_model_type(path) == "t2v"

    # ours, read the way musubi does: the latents_{F}x{H}x{W}, latents_image_{F}x{H}x{W} and clip_ tensors
    ours = _cache_files(i2v_workspace.cache_dir("i2v"))[0]
    with safe_open(str(ours), framework="pt") as f:
        names = {k.rsplit("_", 1)[0]: f.get_slice(k).get_shape() for k in f.keys()}
        assert {"architecture", "width", "height", "format_version", "frame_count"} <= set(f.metadata())
    assert names == {"latents_2x8x8": [16, 2, 8, 8], "latents_image_2x8x8": [20, 2, 8, 8], "clip": [17, 64]}


def test_cache_compatibility_rules():
    assert cache_compatible("i2v", "i2v_a14b") and cache_compatible("i2v", "t2v") and cache_compatible("flf2v", "t2v")
    assert not cache_compatible("t2v", "i2v") and not cache_compatible("i2v_a14b", "i2v")
    assert not cache_compatible("i2v", "flf2v") and not cache_compatible("flf2v", "i2v")


def test_a_text_to_video_cache_is_a_clear_error_naming_the_command(train_workspace, tmp_path, tiny_kit):
    from wantrainer.core.wan_network_trainer import build_trainer

    cfg = load(train_workspace.write(tmp_path, dit=str(tiny_kit.dit_wan21_i2v), clip=str(tiny_kit.clip)))
    with pytest.raises(UserError, match=r"made for a t2v model.*i2v model.*wantrainer cache-latents"):
        build_trainer(cfg)


def test_wan21_i2v_cache_without_clip_setting_is_a_clear_error(i2v_workspace, tmp_path):
    values = i2v_workspace.config("i2v", tmp_path / "out")
    del values["clip"]
    cfg = load(write_config(tmp_path / "c.toml", values))
    with pytest.raises(UserError, match="`clip` is not set"):
        cache_latents(cfg)


def _lora(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("model_type", ["i2v", "flf2v", "i2v_a14b"])
def test_image_to_video_models_train(i2v_workspace, tmp_path, model_type):
    from wantrainer.core.wan_network_trainer import build_trainer

    cfg = load(write_config(tmp_path / "c.toml", i2v_workspace.config(model_type, tmp_path / "out")))
    trainer = build_trainer(cfg)
    assert trainer.train() == "completed"
    lora = _lora(tmp_path / "out" / "lora.safetensors")
    has_img = any("k_img" in k for k in lora)
    assert has_img == (model_type != "i2v_a14b")
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert sum(float(u.abs().sum()) for u in ups) > 0  # the LoRA learned something
