"""Resume is bit-identical (CPU, fp32) whatever draws random numbers: every option that consumes randomness,
resumed mid-epoch in a process whose global generators were used in between (as a fresh process after kill -9
would have them)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from train_support import load, lora_tensors
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer

WAN22 = "wan22"

CASES = {
    "network_dropout+workers": dict(network_dropout=0.1, max_data_loader_n_workers=2),
    "network_dropout+checkpointing": dict(network_dropout=0.1, gradient_checkpointing=True),
    "rank_dropout": dict(rank_dropout=0.3),
    "module_dropout": dict(module_dropout=0.3),
    "caption_dropout": dict(caption_dropout_rate=0.5),
    "loraplus": dict(loraplus_lr_ratio=4.0, network_dropout=0.1),
    "accumulation": dict(gradient_accumulation_steps=2, network_dropout=0.1, max_train_steps=5),
    **{f"timesteps_{m}": dict(timestep_sampling=m, network_dropout=0.1)
       for m in ("uniform", "sigmoid", "shift", "logsnr", "qinglong", "flux_shift", "logit_normal")},
    "wan22_shared": dict(target=WAN22, dual_lora_mode="shared", network_dropout=0.1, rank_dropout=0.2),
    "wan22_separate": dict(target=WAN22, dual_lora_mode="separate", network_dropout=0.1, module_dropout=0.2),
}


def _config(ws, folder, values):
    values = dict(values)
    caption_dropout = values.pop("caption_dropout_rate", None)
    if values.pop("target", None) == WAN22:
        kit = ws.kit
        values.update(target_model="wan22", dit=str(kit.dit_wan22_low), dit_high_noise=str(kit.dit_wan22_high),
                      timestep_boundary=500)
    if caption_dropout is not None:
        datasets = ws.config(folder)["datasets"]
        datasets["train"][0]["caption_dropout_rate"] = caption_dropout
        values["datasets"] = datasets
    return load(ws.write(folder, log_with="none", **values))


def _disturb_global_generators():
    """What a new process, data-loader workers or other code do to the process-wide generators."""
    torch.manual_seed(12345)
    torch.rand(17)
    random.seed(5)
    np.random.seed(9)


class GlobalDraws(Handler):
    """Other code drawing from the process-wide generators between steps (only in the resumed run)."""

    name = "global_draws"

    def on_train_start(self, trainer):
        _disturb_global_generators()

    def on_step_end(self, trainer):
        torch.rand(3)
        random.random()


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_is_bit_identical_with_every_random_option(train_workspace, tmp_path, case):
    values = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, seed=11)
    values.update(CASES[case])
    straight = build_trainer(_config(train_workspace, tmp_path / "a", values))
    assert straight.train() == "completed"
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    assert state.is_dir()
    _disturb_global_generators()
    resumed = build_trainer(_config(train_workspace, tmp_path / "b", dict(values, resume=str(state))),
                            extra_handlers=[GlobalDraws()])
    assert resumed.train() == "completed" and resumed.state.step == straight.state.step
    names = sorted(p.name for p in (tmp_path / "a" / "out").glob("lora*.safetensors") if "-step" not in p.name)
    assert names
    for name in names:
        a, b = lora_tensors(tmp_path / "a" / "out" / name), lora_tensors(tmp_path / "b" / "out" / name)
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff == 0.0, f"{name}: resumed LoRA differs from the uninterrupted run by {diff}"


def test_dropout_draws_differ_between_steps_and_change_the_result(train_workspace, tmp_path):
    """The cases above are not vacuous: the dropout stream changes the trained LoRA."""
    base = dict(max_train_steps=3, seed=11)
    build_trainer(_config(train_workspace, tmp_path / "plain", base)).train()
    build_trainer(_config(train_workspace, tmp_path / "drop", dict(base, network_dropout=0.1))).train()
    a = lora_tensors(tmp_path / "plain" / "out" / "lora.safetensors")
    b = lora_tensors(tmp_path / "drop" / "out" / "lora.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-6
