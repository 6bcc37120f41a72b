"""EMA of the trained weights: the saved EMA equals one computed by hand from every step's weights; resume."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from train_support import load, lora_tensors
from wantrainer.config_parser import ConfigError
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer


class Weights(Handler):
    """Every network's tensors after every step (and before the first)."""

    name = "weights"

    def __init__(self):
        self.steps: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_start(self, trainer):
        self.initial = self._weights(trainer)

    def on_step_end(self, trainer):
        self.steps.append(self._weights(trainer))

    @staticmethod
    def _weights(trainer):
        return {n: {k: v.detach().clone().float() for k, v in net.state_dict().items()}
                for n, net in trainer.networks.items()}


def by_hand(initial, steps, *, decay, every=1, start=0, warmup="none", power=2 / 3, updated=None):
    """The EMA as the docs define it, from the weights after every step."""
    ema = {k: v.clone() for k, v in initial.items()}
    n = 0
    for index, weights in enumerate(steps, start=1):
        if updated is not None and not updated[index - 1]:
            continue
        if index <= start:
            ema = {k: v.clone() for k, v in weights.items()}
        elif index % every == 0:
            n += 1
            d = {"linear": min(decay, (1 + n) / (10 + n)), "power": min(decay, 1 - (1 + n) ** -power),
                 "none": decay}[warmup]
            ema = {k: ema[k] * d + weights[k] * (1 - d) for k in ema}
    return ema


def run(ws, folder, handlers=(), **values):
    values.setdefault("log_with", "none")
    trainer = build_trainer(load(ws.write(folder, enable_ema=True, **values)), extra_handlers=list(handlers))
    assert trainer.train() == "completed"
    return trainer


@pytest.mark.parametrize("options", [
    dict(ema_decay=0.7),
    dict(ema_decay=0.9, ema_update_every=2, ema_start_step=2, ema_warmup="linear"),
    dict(ema_decay=0.95, ema_warmup="power", ema_warmup_power=0.5, ema_device="cpu"),
], ids=["plain", "every-start-linear", "power-cpu"])
def test_ema_file_equals_the_ema_by_hand(train_workspace, tmp_path, options):
    weights = Weights()
    trainer = run(train_workspace, tmp_path, [weights], max_train_steps=6, learning_rate=2e-2, **options)
    out = tmp_path / "out"
    saved = lora_tensors(out / "lora-ema.safetensors")
    expected = by_hand(weights.initial["default"], [s["default"] for s in weights.steps],
                       decay=options["ema_decay"], every=options.get("ema_update_every", 1),
                       start=options.get("ema_start_step", 0), warmup=options.get("ema_warmup", "none"),
                       power=options.get("ema_warmup_power", 2 / 3))
    final = lora_tensors(out / "lora.safetensors")
    assert saved.keys() == final.keys()
    trained = [k for k in expected if not k.endswith(".alpha")]
    for key in trained:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-7)
    gap = max(float((saved[k] - final[k]).abs().max()) for k in trained)
    assert gap > 1e-4  # the EMA is not the final weights
    with safe_open(str(out / "lora-ema.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_ema"] == "true" and meta["modelspec.architecture"].endswith("/lora")
    network = trainer.networks["default"]
    network.load_weights(out / "lora-ema.safetensors")  # loads as the LoRA does
    assert all(torch.equal(network.state_dict()[k].float(), saved[k]) for k in trained)


def test_half_life_sets_the_decay(train_workspace, tmp_path):
    trainer = run(train_workspace, tmp_path, max_train_steps=2, ema_half_life_steps=4.0, ema_update_every=2)
    assert trainer.last_step.metrics["ema/decay"] == pytest.approx(0.5 ** 0.5)


def test_ema_resume_is_bit_identical(train_workspace, tmp_path):
    common = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, ema_decay=0.8, learning_rate=2e-2)
    run(train_workspace, tmp_path / "a", **common)
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    assert (tmp_path / "a" / "out" / "lora-step00000003-ema.safetensors").is_file()
    run(train_workspace, tmp_path / "b", resume=str(state), **common)
    a, b = (lora_tensors(tmp_path / n / "out" / "lora-ema.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_separate_wan22_loras_have_one_ema_each(train_workspace, tmp_path):
    kit = train_workspace.kit
    weights = Weights()
    trainer = run(train_workspace, tmp_path, [weights], target_model="wan22", dit=str(kit.dit_wan22_low),
                  dit_high_noise=str(kit.dit_wan22_high), timestep_boundary=500, max_train_steps=6,
                  dual_lora_mode="separate", ema_decay=0.6, learning_rate=2e-2)
    out = tmp_path / "out"
    experts = [s for s in trainer.state.expert_steps if trainer.state.expert_steps[s]]
    assert sorted(experts) == ["high_noise", "low_noise"]
    for name in ("high_noise", "low_noise"):
        steps = [s[name] for s in weights.steps]
        changed = [i == 0 and not all(torch.equal(steps[0][k], weights.initial[name][k]) for k in steps[0])
                   or i > 0 and not all(torch.equal(steps[i][k], steps[i - 1][k]) for k in steps[i])
                   for i in range(len(steps))]
        expected = by_hand(weights.initial[name], steps, decay=0.6, updated=changed)
        saved = lora_tensors(out / f"lora_{name}-ema.safetensors")
        for key in (k for k in expected if not k.endswith(".alpha")):
            torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-7)


def test_validation_and_samples_with_the_ema(train_workspace, tmp_path):
    trainer = run(train_workspace, tmp_path, val=True, max_train_steps=2, validate_every_n_steps=2,
                  validate_with_ema=True, ema_decay=0.5, learning_rate=5e-2)
    val = next(h for h in trainer.handlers if h.name == "validation")
    assert {"val/loss", "val_ema/loss"} <= set(val.last)
    assert val.last["val/loss"] != val.last["val_ema/loss"]
    before = {k: v.clone() for k, v in trainer.networks["default"].state_dict().items()}
    val._last_step = None
    val.run(trainer)  # the EMA swapped in and out again: the trained weights are exactly restored
    assert all(torch.equal(before[k], v) for k, v in trainer.networks["default"].state_dict().items())


def test_ema_keys_without_enable_ema_are_reported(train_workspace, tmp_path):
    with pytest.raises(ConfigError, match="enable_ema"):
        load(train_workspace.write(tmp_path, ema_decay=0.9))
    with pytest.raises(ConfigError, match="ema_half_life_steps"):
        load(train_workspace.write(tmp_path, enable_ema=True, ema_decay=0.9, ema_half_life_steps=3))


def test_samples_with_the_ema(train_workspace, tmp_path):
    kit = train_workspace.kit
    prompt = {"text": "a blue square", "width": 32, "height": 32, "frames": 1, "steps": 2, "seed": 9,
              "cfg_scale": 1.0, "sample_solver": "euler"}
    run(train_workspace, tmp_path, max_train_steps=2, sample_every_n_steps=2, sample_with_ema=True, ema_decay=0.5,
        learning_rate=5e-2, t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir), vae=str(kit.vae),
        sample_prompts=[prompt])
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert names == ["lora-ema_step00000002_p00_s9.png", "lora_step00000002_p00_s9.png"]
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / "out" / "sample" / n), dtype=np.float32) for n in names)
    assert np.abs(a - b).max() > 0  # other weights, other picture
