"""The training loop on the tiny kit: it learns, logs, skips non-finite steps and runs enhancements."""

from __future__ import annotations

import importlib.util
import math
import os
import signal

import pytest
import torch

from train_support import load
from wantrainer.cli import main as cli_main
from wantrainer.core.handlers.base import Handler
from wantrainer.core.handlers.validation import ValidationHandler
from wantrainer.core.training_core import NonFiniteLossError
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.enhancements.base import BaseEnhancement
from wantrainer.enhancements.registry import register, unregister
from wantrainer.errors import UserError

LEARN_STEPS = 40
LEARN_MARGIN = 0.07
"""The held-out loss must fall by at least 7 % (it falls by about 12 % on the kit)."""


def test_learning_proof_heldout_loss_falls(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, val=True, max_train_steps=LEARN_STEPS, learning_rate=1e-2,
                                     network_dim=8, network_alpha=8.0, validate_on_epoch_end=True, log_with="none"))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)  # held-out images, fixed noise, timesteps 100..900
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    assert after["val/loss"] < (1 - LEARN_MARGIN) * before["val/loss"], (before, after)
    for t in cfg.validation.validation_timesteps:
        assert after[f"val/loss_t{t}"] < before[f"val/loss_t{t}"]
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_tensorboard_has_the_named_scalars(train_workspace, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load(train_workspace.write(tmp_path, max_train_steps=3, max_grad_norm=0.5))
    assert build_trainer(cfg).train() == "completed"
    events = EventAccumulator(str(tmp_path / "out" / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/current", "loss/average", "lr/group0", "grad_norm", "samples_per_sec", "timing/data",
                "timing/forward", "timing/backward", "timing/optimizer"}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2, 3]
    assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars("grad_norm"))
    assert events.Scalars("lr/group0")[0].value == pytest.approx(2e-3)


def test_max_train_epochs_sets_the_length(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, max_train_epochs=2, gradient_accumulation_steps=2,
                                     save_every_n_epochs=1, log_with="none"))
    trainer = build_trainer(cfg)
    assert trainer.total_steps == 2  # 2 batches per epoch, 2 micro-batches per step
    trainer.train()
    assert trainer.state.epoch == 2
    assert (tmp_path / "out" / "lora-000001.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_a_user_error(train_workspace, tmp_path):
    with pytest.raises(UserError, match="pip install wandb"):
        build_trainer(load(train_workspace.write(tmp_path, log_with="wandb")))


def test_log_with_none_writes_nothing(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, max_train_steps=1, log_with="none"))
    build_trainer(cfg).train()
    assert not (tmp_path / "out" / "logs").exists()


class _Recorder(BaseEnhancement):
    """A test enhancement: a trainable scalar pulled towards 1 by its own loss term; records every hook."""

    calls: list[str] = []

    def __init__(self) -> None:
        self.param = torch.nn.Parameter(torch.zeros(()))
        self.model = None

    @classmethod
    def from_config(cls, cfg):
        return cls() if cfg.network.network_dim == 4 else None

    def setup_hooks(self, run):
        self.model = run.model
        self.calls.append("setup_hooks")

    def trainable_params(self):
        return [self.param]

    def modify_inputs(self, batch):
        self.calls.append("modify_inputs")
        return {**batch, "latents": batch["latents"] * 1.0}

    def loss(self, ctx):
        assert ctx.pred is not None and ctx.pred.shape == ctx.target.shape and ctx.model is self.model
        return (self.param - 1.0) ** 2, {"recorder/param": float(self.param.detach())}

    def on_step_end(self, state):
        self.calls.append(f"step{state.step}")

    def remove_hooks(self):
        self.calls.append("remove_hooks")


@pytest.fixture
def recorder():
    _Recorder.calls = []
    register("test_recorder")(_Recorder)
    yield _Recorder
    unregister("test_recorder")


def test_enhancement_protocol_hooks_and_params(train_workspace, tmp_path, recorder):
    cfg = load(train_workspace.write(tmp_path, max_train_steps=3, gradient_accumulation_steps=2,
                                     learning_rate=0.1))
    trainer = build_trainer(cfg)
    enh = next(e for e in trainer.enhancements if isinstance(e, recorder))
    trainer.train()
    calls = recorder.calls
    assert calls[0] == "setup_hooks" and calls[-1] == "remove_hooks"
    assert calls.count("modify_inputs") == 6  # 3 steps x 2 micro-batches
    assert [c for c in calls if c.startswith("step")] == ["step1", "step2", "step3"]
    assert 0.0 < float(enh.param.detach()) <= 1.0  # trained by the same optimiser as the LoRA
    assert "recorder/param" in trainer.last_step.metrics


class _NaNAfter(BaseEnhancement):
    """Makes the loss NaN from a given step on."""

    start = 3

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def loss(self, ctx):
        bad = ctx.step + 1 >= self.start
        return (torch.tensor(float("nan")) if bad else torch.zeros(())), {}


def test_nonfinite_steps_are_skipped_then_the_run_stops(train_workspace, tmp_path):
    register("test_nan")(_NaNAfter)
    try:
        cfg = load(train_workspace.write(tmp_path, max_train_steps=20, max_nonfinite_steps=3,
                                         save_every_n_steps=2, save_state=True, log_with="none"))
        trainer = build_trainer(cfg)
        with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps"):
            trainer.train()
    finally:
        unregister("test_nan")
    out = tmp_path / "out"
    assert trainer.stop_reason == "failed"
    assert trainer.state.step == 5 and trainer.state.nonfinite_in_row == 3  # steps 3, 4, 5 skipped
    assert trainer.groups[0].steps == 2  # only the two good steps moved the weights
    assert (out / "lora-step00000002.safetensors").is_file()
    assert (out / "lora-step00000002-state" / "COMPLETE.json").is_file()
    assert not (out / "lora-step00000004.safetensors").exists()  # nothing saved from the bad steps
    assert not (out / "lora.safetensors").exists()


class _StopAt(Handler):
    name = "stopper"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the trainer's handler catches it


def test_sigterm_saves_state_and_exits_cleanly(train_workspace, tmp_path):
    cfg = load(train_workspace.write(tmp_path, max_train_steps=10, log_with="none"))
    trainer = build_trainer(cfg, extra_handlers=[_StopAt(3)])
    assert trainer.train() == "interrupted"
    out = tmp_path / "out"
    assert trainer.state.step == 3
    assert (out / "lora-step00000003.safetensors").is_file()
    assert (out / "lora-step00000003-state" / "COMPLETE.json").is_file()
    assert not (out / "lora.safetensors").exists()


def test_cli_train_and_user_errors(train_workspace, tmp_path, capsys):
    path = train_workspace.write(tmp_path, max_train_steps=2, log_with="none")
    assert cli_main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    values = train_workspace.config(tmp_path / "out2", max_train_steps=2)
    values["dit"] = str(tmp_path / "missing.safetensors")
    from train_support import write_config

    bad = write_config(tmp_path / "bad.toml", values)
    assert cli_main(["train", "--config", str(bad)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
