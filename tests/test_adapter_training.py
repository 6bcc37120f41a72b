"""LoHa, LoKr and DoRA in the trainer: they learn, resume bit for bit, and DDP on 2 processes equals 1 process."""

from __future__ import annotations

import pytest
import torch

from test_ddp_train import distinct_config, scalars, torchrun_train
from test_resume import assert_same_lora, run
from train_support import load, lora_tensors
from wantrainer.core.handlers.validation import ValidationHandler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.networks.formats import adapter_type, load_lora

TRAINED = {  # id -> (config values, the type the saved file holds)
    "loha": ({"network_module": "lycoris.kohya", "network_args": ["algo=loha"], "network_dim": 4,
              "network_alpha": 4.0}, "loha"),
    "lokr": ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=4"], "network_dim": 4,
              "network_alpha": 4.0}, "lokr"),
    "dora": ({"network_args": ["dora_wd=True"], "network_dim": 8, "network_alpha": 8.0}, "lora+dora"),
}
LEARN_STEPS = 40
LEARN_MARGIN = 0.07
"""Held-out loss must fall by 7 %; measured on the kit: LoHa 13.0 %, LoKr 11.4 %, DoRA 12.5 % (LoRA 12.5 %)."""


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(TRAINED))
def test_learning_proof_heldout_loss_falls(adapter, train_workspace, tmp_path):
    values, kind = TRAINED[adapter]
    cfg = load(train_workspace.write(tmp_path, val=True, max_train_steps=LEARN_STEPS, learning_rate=1e-2,
                                     validate_on_epoch_end=True, log_with="none", **values))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    assert after["val/loss"] < (1 - LEARN_MARGIN) * before["val/loss"], (before, after)
    for t in cfg.validation.validation_timesteps:
        assert after[f"val/loss_t{t}"] < before[f"val/loss_t{t}"]
    sd, meta = load_lora(tmp_path / "out" / "lora.safetensors")
    assert adapter_type(sd) == kind
    assert meta["ss_network_module"] == cfg.network.network_module
    assert meta["ss_network_args"] == str(cfg.network.network_args)


@pytest.mark.parametrize("adapter", sorted(TRAINED))
def test_resume_is_bit_identical(adapter, train_workspace, tmp_path):
    values, _ = TRAINED[adapter]
    common = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, module_dropout=0.2, **values)
    run(train_workspace, tmp_path / "a", **common)
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    resumed, reason = run(train_workspace, tmp_path / "b", resume=str(state), **common)
    assert reason == "completed" and resumed.state.step == 4
    assert_same_lora(tmp_path / "a" / "out" / "lora.safetensors", tmp_path / "b" / "out" / "lora.safetensors")
    mid = lora_tensors(tmp_path / "a" / "out" / "lora-step00000002.safetensors")
    end = lora_tensors(tmp_path / "a" / "out" / "lora.safetensors")
    assert any(not torch.equal(mid[k], end[k]) for k in mid)  # it trained after the save


@pytest.mark.slow
@pytest.mark.parametrize("adapter", sorted(TRAINED))
def test_two_process_cpu_run_matches_one_process(adapter, train_workspace, tmp_path):
    values, _ = TRAINED[adapter]
    single = distinct_config(train_workspace, tmp_path / "single", batch_size=2, **values)
    assert build_trainer(load(single)).train() == "completed"
    torchrun_train(distinct_config(train_workspace, tmp_path / "ddp", batch_size=1, **values))
    one = scalars(tmp_path / "single" / "out" / "logs", "loss/current")
    two = scalars(tmp_path / "ddp" / "out" / "logs", "loss/current")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    a = lora_tensors(tmp_path / "single" / "out" / "lora.safetensors")
    b = lora_tensors(tmp_path / "ddp" / "out" / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam turns summation-order noise in near-zero gradients into updates of up to lr: whole-tensor
        assert (b[key] - a[key]).norm() <= 1e-3 * a[key].norm() + 1e-6, key  # relative error, not per element
    zero_at_start = (".hada_w2_a", ".lokr_w2_b", ".lora_up.weight")
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(zero_at_start))  # it trained
