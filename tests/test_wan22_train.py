"""Wan 2.2 two-expert training on two different tiny DiTs: regimes, weight swaps, separate LoRAs, resume."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from train_support import load, lora_tensors
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.models.wan.loading import load_wan_dit

PROBE = "blocks.0.self_attn.q.weight"


def wan22(ws, folder, **values):
    kit = ws.kit
    base = dict(target_model="wan22", dit=str(kit.dit_wan22_low), dit_high_noise=str(kit.dit_wan22_high),
                timestep_boundary=500, max_train_steps=8, log_with="none")
    base.update(values)
    return load(ws.write(folder, **{k: v for k, v in base.items() if v is not None}))


class Snapshots(Handler):
    """After every step: which expert trained and the weights of every network."""

    name = "snapshots"

    def __init__(self):
        self.steps: list[tuple[str, dict[str, dict[str, torch.Tensor]]]] = []

    def on_train_start(self, trainer):
        self.initial = self._weights(trainer)

    def on_step_end(self, trainer):
        self.steps.append((trainer.last_step.expert, self._weights(trainer)))

    @staticmethod
    def _weights(trainer):
        return {n: {k: v.detach().clone() for k, v in net.state_dict().items()} for n, net in trainer.networks.items()}


def regime_probe(trainer, expected_weights):
    """A forward pre-hook: every batch is on one side of the boundary and the model holds that expert's weights."""
    seen = []
    model = trainer.model

    def hook(module, args, kwargs):
        t = kwargs["timestep"] / 1000.0
        high = bool((t >= trainer.experts.boundary).all())
        assert high or bool((t < trainer.experts.boundary).all()), f"mixed regimes in one batch: {t}"
        name = "high_noise" if high else "low_noise"
        weight = model.get_submodule(PROBE.rsplit(".", 1)[0]).weight
        assert torch.equal(weight, expected_weights[name]), f"{name} batch ran on the other expert's weights"
        seen.append(name)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def expert_weights(tiny_kit):
    high = load_wan_dit(tiny_kit.dit_wan22_high, dtype=torch.float32).state_dict()[PROBE]
    low = load_wan_dit(tiny_kit.dit_wan22_low, dtype=torch.float32).state_dict()[PROBE]
    assert not torch.equal(high, low)
    return {"high_noise": high, "low_noise": low}


@pytest.mark.parametrize(("offload", "swap"), [(True, 0), (False, 0), (False, 1)])
def test_separate_mode_swaps_experts_and_trains_each_lora_on_its_own_steps(train_workspace, tmp_path,
                                                                        expert_weights, offload, swap):
    cfg = wan22(train_workspace, tmp_path, dual_lora_mode="separate", offload_inactive_dit=offload,
                blocks_to_swap=swap, gradient_checkpointing=bool(swap))
    snaps = Snapshots()
    trainer = build_trainer(cfg, extra_handlers=[snaps])
    assert trainer.experts.names == ["high_noise", "low_noise"] and trainer.experts.boundary == 0.5
    seen = regime_probe(trainer, expert_weights)
    trainer.train()
    experts = [e for e, _ in snaps.steps]
    assert seen == experts and set(experts) == {"high_noise", "low_noise"}
    previous = snaps.initial
    for expert, weights in snaps.steps:
        other = "low_noise" if expert == "high_noise" else "high_noise"
        assert any(not torch.equal(weights[expert][k], previous[expert][k]) for k in weights[expert])
        assert all(torch.equal(weights[other][k], previous[other][k]) for k in weights[other])
        previous = weights
    assert trainer.state.expert_steps == {e: experts.count(e) for e in ("high_noise", "low_noise")}
    out = tmp_path / "out"
    for expert in ("high_noise", "low_noise"):
        saved = lora_tensors(out / f"lora_{expert}.safetensors")
        final = snaps.steps[-1][1][expert]
        assert all(torch.equal(saved[k], final[k].float()) for k in final)
        with safe_open(str(out / f"lora_{expert}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert meta["ss_expert"] == expert and meta["modelspec.architecture"] == "wan2.2/lora"
        assert meta["modelspec.timestep_range"] == ("500,1000" if expert == "high_noise" else "0,500")
    assert not (out / "lora.safetensors").exists()


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_wan22_resume_is_bit_identical(train_workspace, tmp_path, mode):
    common = dict(dual_lora_mode=mode, max_train_steps=6, save_every_n_steps=3, save_state=True)
    build_trainer(wan22(train_workspace, tmp_path / "a", **common)).train()
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    resumed = build_trainer(wan22(train_workspace, tmp_path / "b", resume=str(state), **common))
    resumed.train()
    names = ["lora.safetensors"] if mode == "shared" else ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]
    assert sorted(p.name for p in (tmp_path / "b" / "out").glob("lora*.safetensors")) == names
    for name in names:
        a, b = lora_tensors(tmp_path / "a" / "out" / name), lora_tensors(tmp_path / "b" / "out" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_expert_runs_follow_the_timestep_range(train_workspace, tmp_path, expert_weights):
    cfg = wan22(train_workspace, tmp_path / "low", dit_high_noise=None, max_timestep=400, max_train_steps=3)
    trainer = build_trainer(cfg)
    assert trainer.experts.names == ["low_noise"]
    seen = regime_probe(trainer, expert_weights)
    trainer.train()
    assert seen == ["low_noise"] * 3
    assert (tmp_path / "low" / "out" / "lora.safetensors").is_file()

    cfg = wan22(train_workspace, tmp_path / "high", min_timestep=600, max_train_steps=2)
    trainer = build_trainer(cfg)
    assert trainer.experts.names == ["high_noise"]
    assert regime_probe(trainer, expert_weights) is not None
    trainer.train()

    with pytest.raises(UserError, match="dit_high_noise"):
        build_trainer(wan22(train_workspace, tmp_path / "bad", dit_high_noise=None))


@pytest.mark.parametrize("sampling", ["flux_shift", "qinglong"])
def test_resolution_dependent_samplers_train_both_experts(train_workspace, tmp_path, sampling):
    """flux_shift / qinglong need the token count to measure each expert's share of the timestep mass."""
    trainer = build_trainer(wan22(train_workspace, tmp_path, timestep_sampling=sampling, max_train_steps=4))
    assert 0.0 < trainer.regimes.share("high_noise") < 1.0
    assert trainer.train() == "completed"


def test_sage_attention_is_refused_before_training_starts(train_workspace, tmp_path):
    with pytest.raises(UserError, match="inference only"):
        build_trainer(wan22(train_workspace, tmp_path, attn_mode="sage_attn"))
