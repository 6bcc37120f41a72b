"""Image-to-video sampling: our conditioning + denoising loop on the kit's I2V DiTs against diffusers'
WanImageToVideoPipeline on the same weights (its own conditioning from the same image, its own loop), and the
prompt / CLI image checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_support import diffusers_twin
from wantrainer.errors import UserError
from wantrainer.sampling.conditioning import bind, check_prompt_images, condition_from_frames, load_frame
from wantrainer.sampling.generate import ExpertSwitch, GenerationSettings, generate_latents, initial_noise
from wantrainer.sampling.pipeline import dit_model_fn

pytestmark = pytest.mark.usefixtures("torch_one_thread")

W, H, FRAMES = 32, 32, 5


def _image(path, seed):
    rng = np.random.default_rng(seed)
    pixels = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _embeds(text_dim=64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, text_dim, generator=g), torch.randn(3, text_dim, generator=g)


def _diffusers_latents(transformer, transformer_2, boundary, vae, settings, pos, neg, image, last, image_embeds):
    from diffusers import WanImageToVideoPipeline

    from wantrainer.sampling.generate import latent_shape, make_scheduler

    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=make_scheduler(
        settings.solver, settings.flow_shift), transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=boundary)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if image_embeds is not None:
        # diffusers takes `image` or `image_embeds`, not both; its encode_image (a transformers CLIPVisionModel with
        # PIL preprocessing) is replaced by our features, which test_clip_vision checks against transformers
        pipe.encode_image = lambda image, device: image_embeds
    pad = lambda c: torch.cat([c, c.new_zeros(512 - c.shape[0], c.shape[1])])[None]  # noqa: E731
    noise = initial_noise(latent_shape(settings.width, settings.height, settings.frames), settings.seed)
    return pipe(image=image, last_image=last, prompt_embeds=pad(pos),
                negative_prompt_embeds=pad(neg), height=settings.height, width=settings.width,
                num_frames=settings.frames, num_inference_steps=settings.steps, guidance_scale=settings.cfg_scale,
                latents=noise, output_type="latent", return_dict=False)[0]  # fmt: skip


@pytest.mark.parametrize("model_type", ["i2v", "flf2v"])
def test_wan21_i2v_and_flf2v_match_diffusers_i2v_pipeline(tiny_kit, tmp_path, model_type):
    from wantrainer.models.wan.clip_vision import WanCLIPVision
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.models.wan.vae import WanVAE

    path = tiny_kit.dit_wan21_i2v if model_type == "i2v" else tiny_kit.dit_wan21_flf2v
    dit = load_wan_dit(path, dtype=torch.float32).eval()
    vae, clip = WanVAE.load(tiny_kit.vae), WanCLIPVision.load(tiny_kit.clip)
    first_path = _image(tmp_path / "first.png", 1)
    last_path = _image(tmp_path / "last.png", 2) if model_type == "flf2v" else None
    first = load_frame(first_path, W, H)
    last = load_frame(last_path, W, H) if last_path else None
    condition = condition_from_frames(model_type, vae, clip, first, last, FRAMES)
    settings = GenerationSettings(W, H, FRAMES, seed=7, steps=4, cfg_scale=4.0, flow_shift=3.0, solver="unipc")
    pos, neg = _embeds()
    ours = generate_latents(bind(dit_model_fn(dit), condition, "cpu"), pos, neg, settings)

    embeds = condition["clip_fea"].flatten(0, -3)  # diffusers: [frames, tokens, D]
    reference = _diffusers_latents(
        diffusers_twin(dit), None, None, vae.model, settings, pos, neg, Image.open(first_path),
        Image.open(last_path) if last_path else None, embeds,
    )  # fmt: skip
    assert ours.shape == (1, 16, 2, 4, 4)
    assert (ours - reference).abs().max().item() < 1e-4
    # the image matters: another image gives other latents
    other = condition_from_frames(model_type, vae, clip, -first, last, FRAMES)
    moved = generate_latents(bind(dit_model_fn(dit), other, "cpu"), pos, neg, settings)
    assert (moved - ours).abs().max().item() > 1e-3


def test_wan22_i2v_two_experts_match_diffusers_with_the_i2v_boundary(tiny_kit, tmp_path):
    from wantrainer.core.experts import normalise_boundary
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.models.wan.vae import WanVAE

    high = load_wan_dit(tiny_kit.dit_wan22_i2v_high, dtype=torch.float32).eval()
    low = load_wan_dit(tiny_kit.dit_wan22_i2v_low, dtype=torch.float32).eval()
    boundary = normalise_boundary(None, high.config.model_type)
    assert boundary == 0.9
    vae = WanVAE.load(tiny_kit.vae)
    first_path = _image(tmp_path / "first.png", 4)
    condition = condition_from_frames("i2v_a14b", vae, None, load_frame(first_path, W, H), None, FRAMES)
    assert set(condition) == {"y"}
    settings = GenerationSettings(W, H, FRAMES, seed=3, steps=6, cfg_scale=3.5, flow_shift=5.0, solver="unipc")
    pos, neg = _embeds()
    switch = ExpertSwitch(high=dit_model_fn(high), low=dit_model_fn(low), boundary=boundary * 1000)
    ours = generate_latents(bind(switch, condition, "cpu"), pos, neg, settings)
    reference = _diffusers_latents(diffusers_twin(high), diffusers_twin(low), boundary, vae.model, settings, pos,
                                   neg, Image.open(first_path), None, None)  # fmt: skip
    assert (ours - reference).abs().max().item() < 1e-4
    names = [n for n, _ in switch.history]
    assert "high" in names and "low" in names


def test_prompt_images_are_checked_per_model_type(tmp_path):
    from wantrainer.config.output import SamplePrompt

    image = _image(tmp_path / "a.png", 0)
    plain = SamplePrompt(text="a cat", width=W, height=H, frames=FRAMES)
    with_image = plain.model_copy(update={"image": image})
    check_prompt_images("t2v", [plain])
    check_prompt_images("i2v", [with_image])
    with pytest.raises(UserError, match="takes no image"):
        check_prompt_images("t2v", [with_image])
    with pytest.raises(UserError, match="set `image`"):
        check_prompt_images("i2v_a14b", [plain])
    with pytest.raises(UserError, match="last_image"):
        check_prompt_images("flf2v", [with_image])
    with pytest.raises(UserError, match="image not found"):
        check_prompt_images("i2v", [plain.model_copy(update={"image": tmp_path / "missing.png"})])


def test_load_frame_covers_and_centre_crops(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 25:35] = 255  # a white band in the middle
    Image.fromarray(wide).save(tmp_path / "wide.png")
    frame = load_frame(tmp_path / "wide.png", 32, 32)
    assert frame.shape == (3, 32, 32)
    assert frame[:, :, 12:20].min() > 0.9 and frame[:, :, :4].max() < -0.9 and frame[:, :, -4:].max() < -0.9
