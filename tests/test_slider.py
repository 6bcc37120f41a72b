"""Concept sliders: prompts cached by cache-text; after training, +1 and -1 move the target's prediction in opposite
directions along (positive - negative) and 0 is the base model."""

from __future__ import annotations

import shutil

import pytest
import torch

from train_support import load, write_config
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.config_parser import ConfigError
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.dataset.cache_format import load_latent_cache
from wantrainer.enhancements.slider.slider_helper import PROMPTS_FILE, slider_targets
from wantrainer.errors import UserError

PAIR = {"target": "a shape on a background", "positive": "a red circle on a background",
        "negative": "a blue square on a background"}
MIN_COSINE = 0.8
"""+1 must move the target's prediction along (positive - negative) with a cosine above this, -1 below -this (on
the kit 0.93 both ways after 20 steps). The tiny DiT hardly reads its prompt (the direction is about 0.1 % of the
prediction), so the test uses a large guidance strength (20) and a small learning rate."""


def _config(ws, tmp_path, cache, **values):
    kit = ws.kit
    values.setdefault("slider_pairs", [PAIR])
    data = ws.config(tmp_path / "out", t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir), log_with="none",
                     **values)
    data["datasets"]["train"][0]["cache_directory"] = str(cache)
    return load(write_config(tmp_path / "config.toml", data))


@pytest.fixture
def slider_cache(train_workspace, tmp_path):
    cache = shutil.copytree(train_workspace.train_cache, tmp_path / "cache")
    return cache


def _predictions(trainer, embeds, multiplier):
    """The target prompt's prediction at ``multiplier`` on three noised training latents (t = 300, 500, 700)."""
    model, network = trainer.model, trainer.networks["default"]
    out = []
    saved = network.multiplier
    network.set_multiplier(multiplier)
    try:
        for i, item in enumerate(trainer.loader.items[:3]):
            x0 = load_latent_cache(item.latent_path)[0].float()[None]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
            t = 0.3 + 0.2 * i
            x = (1 - t) * x0 + t * noise
            with torch.no_grad():
                out.append(trainer.call_model(model, x, torch.tensor([1000 * t]), [embeds]))
    finally:
        network.set_multiplier(saved)
    return torch.cat(out)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("latents", ["dataset", "noise"])
def test_slider_moves_the_target_both_ways_and_zero_is_the_base(train_workspace, tmp_path, slider_cache, latents):
    cfg = _config(train_workspace, tmp_path, slider_cache, max_train_steps=20, learning_rate=2e-3,
                  slider_guidance_strength=20.0, slider_latents=latents)
    cache_text(cfg)
    assert (slider_cache / PROMPTS_FILE).is_file()
    trainer = build_trainer(cfg)
    slider = next(e for e in trainer.enhancements if e.name == "slider")
    embeds = slider.embeds
    base_target = _predictions(trainer, embeds["p0_target"], 0.0)
    direction = _predictions(trainer, embeds["p0_positive"], 0.0) - _predictions(trainer, embeds["p0_negative"], 0.0)
    assert trainer.train() == "completed"
    plus = _predictions(trainer, embeds["p0_target"], 1.0) - base_target
    minus = _predictions(trainer, embeds["p0_target"], -1.0) - base_target
    zero = _predictions(trainer, embeds["p0_target"], 0.0)
    print(f"slider ({latents}): cos(+1 move, direction) = {_cos(plus, direction):.3f}, "
          f"cos(-1 move, direction) = {_cos(minus, direction):.3f}")
    assert _cos(plus, direction) > MIN_COSINE
    assert _cos(minus, direction) < -MIN_COSINE
    assert torch.equal(zero, base_target)  # multiplier 0 is the base model, exactly
    assert trainer.last_step.metrics["slider/loss"] > 0


def test_slider_targets_follow_the_formula():
    pos, neg, neutral = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5])
    up, down = slider_targets(pos, neg, neutral, 2.0)
    assert float(up) == 4.5 and float(down) == -3.5


def test_slider_samples_at_three_strengths(train_workspace, tmp_path, slider_cache):
    kit = train_workspace.kit
    prompt = {"text": "a shape", "width": 32, "height": 32, "frames": 1, "steps": 2, "seed": 3, "cfg_scale": 1.0}
    cfg = _config(train_workspace, tmp_path, slider_cache, max_train_steps=2, learning_rate=5e-2,
                  sample_every_n_steps=2, vae=str(kit.vae), sample_prompts=[prompt])
    cache_text(cfg)
    assert build_trainer(cfg).train() == "completed"
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert names == ["lora-minus1_step00000002_p00_s3.png", "lora-zero_step00000002_p00_s3.png",
                     "lora_step00000002_p00_s3.png"]


def test_slider_prompts_must_be_cached_and_differ(train_workspace, tmp_path, slider_cache):
    with pytest.raises(UserError, match="cache-text"):
        build_trainer(_config(train_workspace, tmp_path, slider_cache, max_train_steps=1))
    with pytest.raises(ConfigError, match="same prompt"):
        _config(train_workspace, tmp_path, slider_cache, slider_pairs=[{**PAIR, "negative": PAIR["positive"]}])


def test_noise_latents_ignore_the_dataset():
    from wantrainer.enhancements.base import StepContext
    from wantrainer.enhancements.slider.config import SliderConfig
    from wantrainer.enhancements.slider.slider_helper import SliderHelper

    def ctx(latents):
        noise, t = torch.ones(2, 16, 1, 4, 4), torch.tensor([0.25, 0.75])
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
        return StepContext(batch={}, latents=latents, noise=noise, noisy=noisy, target=noise - latents, t=t,
                           timesteps=1000 * t, step=3)

    a, b = torch.zeros(2, 16, 1, 4, 4), torch.full((2, 16, 1, 4, 4), 5.0)
    dataset = SliderHelper(SliderConfig(slider_pairs=[PAIR]), seed=1)
    noise = SliderHelper(SliderConfig(slider_pairs=[PAIR], slider_latents="noise"), seed=1)
    assert torch.equal(dataset._inputs(ctx(a)), ctx(a).noisy)
    assert torch.equal(noise._inputs(ctx(a)), noise._inputs(ctx(b)))  # the dataset's latents are not used
    assert not torch.equal(noise._inputs(ctx(a)), ctx(a).noisy)


def test_slider_resume_is_bit_identical(train_workspace, tmp_path, slider_cache):
    common = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, learning_rate=2e-3,
                  slider_guidance_strength=20.0, slider_latents="noise")
    cfg = _config(train_workspace, tmp_path / "a", slider_cache, **common)
    cache_text(cfg)
    assert build_trainer(cfg).train() == "completed"
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    assert build_trainer(_config(train_workspace, tmp_path / "b", slider_cache, resume=str(state),
                                 **common)).train() == "completed"
    from train_support import lora_tensors

    a, b = (lora_tensors(tmp_path / n / "out" / "lora.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_slider_matches_one_process(train_workspace, tmp_path, slider_cache):
    """Noise latents drawn for the global batch: 2 processes x 1 train the LoRA of 1 process x 2."""
    from test_ddp_train import distinct_config, torchrun_train
    from train_support import TrainWorkspace, lora_tensors

    ws = TrainWorkspace.__new__(TrainWorkspace)
    ws.kit, ws.train_media, ws.train_cache = train_workspace.kit, train_workspace.train_media, slider_cache
    kit = ws.kit
    values = dict(log_with="none", slider_pairs=[PAIR], slider_latents="noise", slider_guidance_strength=20.0,
                  t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir))
    single = load(distinct_config(ws, tmp_path / "single", batch_size=2, **values))
    cache_text(single)
    assert build_trainer(single).train() == "completed"
    torchrun_train(distinct_config(ws, tmp_path / "ddp", batch_size=1, **values))
    a = lora_tensors(tmp_path / "single" / "out" / "lora.safetensors")
    b = lora_tensors(tmp_path / "ddp" / "out" / "lora.safetensors")
    # The same LoRA up to the order of fp32 sums (the gradients are averaged over 2 processes), which the guidance
    # strength of 20 amplifies: relative L2 up to 7e-4 per tensor measured; an element near zero can differ by
    # more than 1e-4 absolute, so the bound is on each tensor as a whole.
    for key in a:
        assert (b[key] - a[key]).norm() <= 2e-3 * a[key].norm(), key


def test_a_slider_step_runs_three_forward_passes(train_workspace, tmp_path, slider_cache):
    """One batched no-grad pass of the three base prompts and one pass at +1 and -1: no dataset forward pass."""
    cfg = _config(train_workspace, tmp_path, slider_cache, max_train_steps=2, gradient_accumulation_steps=2)
    cache_text(cfg)
    trainer = build_trainer(cfg)
    calls = []
    handle = trainer.model.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        assert trainer.train() == "completed"
    finally:
        handle.remove()
    assert calls == [6, 2, 2] * 4  # 2 steps x 2 micro-batches of 2 items
    assert "loss/flow_matching" not in trainer.last_step.metrics
