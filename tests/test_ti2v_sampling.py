"""TI2V-5B sampling on the kit's 48-channel DiT and Wan 2.2 VAE: text-to-video against diffusers' WanPipeline and
image-to-video (clean first frame at timestep 0) against WanImageToVideoPipeline, both with expand_timesteps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_support import diffusers_twin
from train_support import write_config
from wantrainer.cli import main as cli_main
from wantrainer.sampling.generate import GenerationSettings, generate_latents, initial_noise, latent_shape
from wantrainer.sampling.pipeline import dit_model_fn

pytestmark = pytest.mark.usefixtures("torch_one_thread")

W, H, FRAMES = 64, 64, 5


def _setup(tiny_kit):
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.models.wan.vae import WanVAE

    dit = load_wan_dit(tiny_kit.dit_wan22_ti2v, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    return dit, WanVAE.load(tiny_kit.vae22), torch.randn(5, 64, generator=g), torch.randn(3, 64, generator=g)


def _pad(c):
    return torch.cat([c, c.new_zeros(512 - c.shape[0], c.shape[1])])[None]


def _settings():
    return GenerationSettings(W, H, FRAMES, seed=5, steps=4, cfg_scale=4.0, flow_shift=5.0, solver="unipc")


def test_ti2v_text_to_video_matches_diffusers_wan_pipeline(tiny_kit):
    from diffusers import WanPipeline

    from wantrainer.sampling.generate import make_scheduler

    dit, vae, pos, neg = _setup(tiny_kit)
    s = _settings()
    ours = generate_latents(dit_model_fn(dit), pos, neg, s, channels=48, stride=16)
    assert ours.shape == (1, 48, 2, 4, 4)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.model, scheduler=make_scheduler(s.solver, s.flow_shift),
                       transformer=diffusers_twin(dit), expand_timesteps=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(latent_shape(W, H, FRAMES, 48, 16), s.seed)
    want = pipe(prompt_embeds=_pad(pos), negative_prompt_embeds=_pad(neg), height=H, width=W, num_frames=FRAMES,
                num_inference_steps=s.steps, guidance_scale=s.cfg_scale, latents=noise, output_type="latent",
                return_dict=False)[0]  # fmt: skip
    assert (ours - want).abs().max().item() < 1e-4


def test_ti2v_image_to_video_matches_diffusers_with_the_first_frame_at_timestep_zero(tiny_kit, tmp_path):
    from diffusers import WanImageToVideoPipeline

    from wantrainer.sampling.conditioning import load_frame
    from wantrainer.sampling.generate import make_scheduler

    dit, vae, pos, neg = _setup(tiny_kit)
    pixels = (np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "first.png")
    first = vae.encode(load_frame(tmp_path / "first.png", W, H)[None, :, None]).float()
    assert first.shape == (1, 48, 1, 4, 4)
    s = _settings()
    seen = []

    def model_fn(x, t, ctx, **kw):
        seen.append(t.clone())
        return dit_model_fn(dit)(x, t, ctx, **kw)

    ours = generate_latents(model_fn, pos, neg, s, channels=48, stride=16, first_frame=first)
    assert torch.equal(ours[:, :, :1], first)  # the given frame is kept
    tokens = 2 * 2  # latent 4 x 4 patchified 2 x 2
    assert all(t.shape == (1, 2 * tokens) and (t[:, :tokens] == 0).all() and (t[:, tokens:] > 0).all() for t in seen)

    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.model, scheduler=make_scheduler(
        s.solver, s.flow_shift), transformer=diffusers_twin(dit), expand_timesteps=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(latent_shape(W, H, FRAMES, 48, 16), s.seed)
    want = pipe(image=Image.open(tmp_path / "first.png"), prompt_embeds=_pad(pos), negative_prompt_embeds=_pad(neg),
                height=H, width=W, num_frames=FRAMES, num_inference_steps=s.steps, guidance_scale=s.cfg_scale,
                latents=noise, output_type="latent", return_dict=False)[0]  # fmt: skip
    assert (ours - want).abs().max().item() < 1e-4
    text_only = generate_latents(dit_model_fn(dit), pos, neg, s, channels=48, stride=16)
    assert (text_only[:, :, 1:] - ours[:, :, 1:]).abs().max().item() > 1e-3  # the image steers the rest


def test_sample_command_renders_ti2v_text_and_image_prompts(tiny_kit, tmp_path):
    Image.fromarray((np.random.default_rng(2).random((48, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    prompt = {"text": "a red ball", "width": W, "height": H, "frames": FRAMES, "steps": 2, "cfg_scale": 1.0}
    values = {"dit": str(tiny_kit.dit_wan22_ti2v), "vae": str(tiny_kit.vae22), "t5": str(tiny_kit.t5),
              "t5_tokenizer": str(tiny_kit.tokenizer_dir), "mixed_precision": "no", "output_dir": str(tmp_path / "out"),
              "sample_prompts": [prompt, {**prompt, "image": str(tmp_path / "a.png")}]}  # fmt: skip
    assert cli_main(["sample", "--config", str(write_config(tmp_path / "c.toml", values))]) == 0
    assert len(list((tmp_path / "out" / "sample").glob("*.mp4"))) == 2
    # a 16-channel VAE for the 48-channel model, and a size that is not a multiple of 32: clear errors
    bad = dict(values, vae=str(tiny_kit.vae))
    assert cli_main(["sample", "--config", str(write_config(tmp_path / "bad.toml", bad))]) == 2
    odd = dict(values, sample_prompts=[{**prompt, "width": 48}])
    assert cli_main(["sample", "--config", str(write_config(tmp_path / "odd.toml", odd))]) == 2
