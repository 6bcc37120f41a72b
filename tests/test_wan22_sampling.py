"""Wan 2.2 sampling on two different tiny experts: the switch at the boundary and the matching LoRA."""

from __future__ import annotations

import shutil

import pytest
import torch

from train_support import load
from wantrainer.core.handlers.inference import inference_session
from wantrainer.core.handlers.sampling import SamplingHandler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.models.wan.loading import load_wan_dit
from wantrainer.networks.formats import save_lora
from wantrainer.networks.lora_wan import LoRANetwork
from wantrainer.sampling.cli import experts_model_fn, load_experts
from wantrainer.sampling.generate import ExpertSwitch, GenerationSettings, generate_latents
from wantrainer.sampling.pipeline import dit_model_fn

SETTINGS = GenerationSettings(32, 32, 5, seed=4, steps=5, cfg_scale=3.0, flow_shift=5.0, solver="unipc")


def _context(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 64, generator=g), torch.randn(2, 64, generator=g)


def _model_cfg(kit, boundary):
    from wantrainer.config.model import ModelConfig

    return ModelConfig(target_model="wan22", dit=kit.dit_wan22_low, dit_high_noise=kit.dit_wan22_high,
                       mixed_precision="no", timestep_boundary=boundary)


def _raw(path):
    return load_wan_dit(path, dtype=torch.float32).eval()


def test_cli_experts_switch_at_the_boundary_with_their_own_weights(tiny_kit):
    experts = load_experts(_model_cfg(tiny_kit, 900), [], 1.0, torch.device("cpu"))
    switch = experts_model_fn(experts, _model_cfg(tiny_kit, 900), torch.device("cpu"))
    pos, neg = _context()
    out = generate_latents(switch, pos, neg, SETTINGS)
    names = [name for name, _ in switch.history]
    assert set(names) == {"high", "low"}
    assert all((t >= 900) == (name == "high") for name, t in switch.history)
    high, low = _raw(tiny_kit.dit_wan22_high), _raw(tiny_kit.dit_wan22_low)
    right = ExpertSwitch(high=dit_model_fn(high), low=dit_model_fn(low), boundary=900.0)
    swapped = ExpertSwitch(high=dit_model_fn(low), low=dit_model_fn(high), boundary=900.0)
    assert torch.equal(out, generate_latents(right, pos, neg, SETTINGS))
    assert (out - generate_latents(swapped, pos, neg, SETTINGS)).abs().max() > 1e-2


def _random_lora(dit, path, seed):
    network = LoRANetwork(dit, rank=2, alpha=2.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for m in network.lora_modules:
            m.lora_up.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    save_lora(path, network.state_dict(), dtype="fp32")
    return network.lora_modules[0].delta_weight()


@pytest.mark.parametrize("named", [True, False])
def test_cli_applies_each_lora_to_its_expert(tiny_kit, tmp_path, named):
    high_raw, low_raw = _raw(tiny_kit.dit_wan22_high), _raw(tiny_kit.dit_wan22_low)
    high_file = tmp_path / ("x_high_noise.safetensors" if named else "a.safetensors")
    low_file = tmp_path / ("x_low_noise.safetensors" if named else "b.safetensors")
    high_delta = _random_lora(high_raw, high_file, 1)
    low_delta = _random_lora(low_raw, low_file, 2)
    files = [low_file, high_file] if named else [high_file, low_file]  # unnamed: the order is high, low
    experts = load_experts(_model_cfg(tiny_kit, 875), files, 1.0, torch.device("cpu"))
    key = "blocks.0.self_attn.q.weight"
    got_high = experts.high.state_dict()[key] - high_raw.state_dict()[key]
    got_low = experts.low.state_dict()[key] - low_raw.state_dict()[key]
    torch.testing.assert_close(got_high, high_delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_low, low_delta, rtol=1e-4, atol=1e-6)


def test_training_samples_use_each_experts_lora(train_workspace, tmp_path):
    """Separate LoRAs trained on two tiny experts: the in-training sampler equals the standalone one with the
    saved files in the right roles, and differs with the roles swapped."""
    kit = train_workspace.kit
    path = train_workspace.write(
        tmp_path, target_model="wan22", dit=str(kit.dit_wan22_low), dit_high_noise=str(kit.dit_wan22_high),
        dual_lora_mode="separate", timestep_boundary=500, max_train_steps=6, learning_rate=3e-2,
        t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir), vae=str(kit.vae), sample_every_n_epochs=100,
        sample_prompts=[{"text": "a red circle", "width": 32, "height": 32, "frames": 5, "steps": 6}],
    )
    cfg = load(path)
    trainer = build_trainer(cfg)
    assert trainer.train() == "completed"
    assert all(n > 0 for n in trainer.state.expert_steps.values()), trainer.state.expert_steps
    handler = next(h for h in trainer.handlers if isinstance(h, SamplingHandler))
    pos, neg = _context(1)
    active = trainer.experts.active
    with inference_session(trainer):
        switch = handler.model_fn(trainer)
        during = generate_latents(switch, pos, neg, SETTINGS)
    assert trainer.experts.active == active
    assert all((t >= 500) == (name == "high") for name, t in switch.history)

    def standalone(files):
        experts = load_experts(cfg.model, files, 1.0, torch.device("cpu"))
        return generate_latents(experts_model_fn(experts, cfg.model, torch.device("cpu")), pos, neg, SETTINGS)

    out = tmp_path / "out"
    high, low = out / "lora_high_noise.safetensors", out / "lora_low_noise.safetensors"
    plain_high, plain_low = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(high, plain_high)
    shutil.copy(low, plain_low)
    right = standalone([low, high])  # matched by the suffixes
    swapped = standalone([plain_low, plain_high])  # no suffixes: the first file is taken as the high-noise one
    tol = (during - right).abs().max()
    assert tol < 1e-4
    assert (during - swapped).abs().max() > 100 * tol + 1e-4
