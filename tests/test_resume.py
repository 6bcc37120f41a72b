"""Checkpoints and resume: a resumed run is bit-identical to an uninterrupted one (CPU, fp32)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from train_support import load, lora_tensors
from wantrainer.core.checkpoint_io import find_latest_state
from wantrainer.core.handlers.base import Handler
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError


class StopAt(Handler):
    """Asks the trainer to stop (as SIGTERM would) after a given step."""

    name = "stopper"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.stop.request("SIGTERM")


def assert_same_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def run(ws, folder, handlers=None, **values):
    values.setdefault("log_with", "none")
    trainer = build_trainer(load(ws.write(folder, **values)), extra_handlers=handlers)
    return trainer, trainer.train()


def test_resume_mid_epoch_is_bit_identical(train_workspace, tmp_path):
    common = dict(max_train_steps=6, lr_scheduler="linear", lr_warmup_steps=2, network_dropout=0.1,
                  save_every_n_steps=3, save_state=True)
    straight, _ = run(train_workspace, tmp_path / "a", **common)
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    resumed, reason = run(train_workspace, tmp_path / "b", resume=str(state), **common)
    assert reason == "completed" and resumed.state.step == 6
    assert resumed.state.epoch == straight.state.epoch == 3
    assert_same_lora(tmp_path / "a" / "out" / "lora.safetensors", tmp_path / "b" / "out" / "lora.safetensors")
    files = {p.name for p in state.iterdir()}
    assert {"COMPLETE.json", "trainer_state.json", "config.toml", "network_default.safetensors",
            "optimizer_default.pt", "scheduler_default.pt", "rank0.pt", "handlers.pt"} <= files
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 3
    assert "learning_rate" in (state / "config.toml").read_text()


def test_resume_across_epoch_boundary_with_accumulation(train_workspace, tmp_path):
    # 4 images x 3 repeats in batches of 4 = 3 batches per epoch; accumulation 2 -> the second step of every
    # epoch has one micro-batch, and the resumed part crosses epoch boundaries.
    datasets = train_workspace.config(tmp_path)["datasets"]
    datasets["train"][0].update(batch_size=4, num_repeats=3)
    common = dict(max_train_steps=7, gradient_accumulation_steps=2, lr_scheduler="cosine", datasets=datasets,
                  save_every_n_epochs=1, save_state=True)
    straight, _ = run(train_workspace, tmp_path / "straight", **common)
    assert straight.steps_per_epoch == 2 and straight.state.epoch == 3
    final = tmp_path / "straight" / "out" / "lora.safetensors"

    stopped, reason = run(train_workspace, tmp_path / "stopped", handlers=[StopAt(3)], **common)
    assert reason == "interrupted" and stopped.state.step == 3 and stopped.state.batches_in_epoch == 2
    mid = tmp_path / "stopped" / "out" / "lora-step00000003-state"
    _, reason = run(train_workspace, tmp_path / "r1", resume=str(mid), **common)
    assert_same_lora(final, tmp_path / "r1" / "out" / "lora.safetensors")

    boundary = tmp_path / "straight" / "out" / "lora-000001-state"
    resumed, _ = run(train_workspace, tmp_path / "r2", resume=str(boundary), **common)
    assert resumed.state.step == 7
    assert_same_lora(final, tmp_path / "r2" / "out" / "lora.safetensors")


def test_auto_resume_picks_newest_valid_state(train_workspace, tmp_path, caplog):
    common = dict(save_every_n_steps=2, save_state=True)
    run(train_workspace, tmp_path, max_train_steps=4, **common)
    out = tmp_path / "out"
    assert (out / "lora-step00000002-state").is_dir() and (out / "lora-step00000004-state").is_dir()
    (out / "lora-step00000009-state").mkdir()  # half-written: no marker
    (out / "lora-step00000009-state" / "trainer_state.json").write_text("{}")
    (out / ".lora-step00000010-state.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="wantrainer"):
        assert find_latest_state(out, "lora") == out / "lora-step00000004-state"
    assert "lora-step00000009-state" in caplog.text and ".lora-step00000010-state.tmp" in caplog.text
    trainer, _ = run(train_workspace, tmp_path, max_train_steps=6, auto_resume=True, **common)
    assert trainer.state.step == 6 and trainer.groups[0].steps == 6


def test_resume_from_an_incomplete_state_is_a_user_error(train_workspace, tmp_path):
    broken = tmp_path / "broken-state"
    broken.mkdir()
    trainer = build_trainer(load(train_workspace.write(tmp_path, resume=str(broken), log_with="none")))
    with pytest.raises(UserError, match="incomplete"):
        trainer.train()


def test_retention_of_step_and_epoch_saves(train_workspace, tmp_path):
    run(train_workspace, tmp_path, max_train_steps=8, save_every_n_steps=1, save_last_n_steps=2,
        save_every_n_epochs=1, save_last_n_epochs=2, save_state=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("lora") and p.suffix != ".png")
    plots = sorted(p.name.removesuffix("_loss.png") for p in (tmp_path / "out").glob("*_loss.png"))
    assert plots == sorted(n.removesuffix(".safetensors") for n in names if n.endswith(".safetensors"))
    # step saves: at step 7 (the last step save) the ones at most 2 steps older are kept: 5, 6, 7
    assert names == [
        "lora-000002-state", "lora-000002.safetensors", "lora-000003-state",
        "lora-000003.safetensors", "lora-step00000005-state", "lora-step00000005.safetensors",
        "lora-step00000006-state", "lora-step00000006.safetensors",
        "lora-step00000007-state", "lora-step00000007.safetensors", "lora-step00000008-state", "lora.safetensors",
    ]


def test_rerunning_a_finished_run_does_nothing(train_workspace, tmp_path, caplog):
    common = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, auto_resume=True)
    run(train_workspace, tmp_path, **common)
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.WARNING, logger="wantrainer"):
        trainer, reason = run(train_workspace, tmp_path, **common)
    assert reason == "completed" and trainer.state.step == 4 and trainer.groups[0].steps == 4
    assert "already finished" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    trainer, reason = run(train_workspace, tmp_path, **{**common, "max_train_steps": 2})
    assert reason == "completed" and trainer.state.step == 4  # never trains past the state it resumed


@pytest.mark.parametrize(
    "change, message",
    [(dict(network_dim=8), "network_dim"), (dict(loraplus_lr_ratio=4.0), "loraplus_lr_ratio")],
)
def test_resume_with_a_changed_network_is_a_user_error(train_workspace, tmp_path, change, message):
    run(train_workspace, tmp_path / "a", max_train_steps=2, save_every_n_steps=1, save_state=True)
    state = tmp_path / "a" / "out" / "lora-step00000001-state"
    trainer = build_trainer(load(train_workspace.write(tmp_path / "b", resume=str(state), log_with="none",
                                                       max_train_steps=2, **change)))
    with pytest.raises(UserError, match=message):
        trainer.train()


@pytest.mark.parametrize("save_state", [False, True])
def test_a_full_disk_is_a_user_error_and_keeps_earlier_saves(train_workspace, tmp_path, monkeypatch, save_state):
    """The second file write fails: the step-2 LoRA, or (with save_state) the step-1 state folder."""
    import errno

    import wantrainer.utils.atomic as atomic

    calls = []
    real_save_file = atomic.save_file

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # half a file, then the disk is full
            open(filename, "wb").write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", save_file)
    trainer = build_trainer(load(train_workspace.write(tmp_path, max_train_steps=3, save_every_n_steps=1,
                                                       save_state=save_state, log_with="none")))
    with pytest.raises(UserError, match="no space left"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "lora")) and p.suffix != ".png") == [
        "lora-step00000001.safetensors"]
    assert lora_tensors(out / "lora-step00000001.safetensors")  # the earlier save is whole


class LrRecorder(Handler):
    name = "lr_recorder"

    def __init__(self):
        self.lrs = {}

    def on_step_end(self, trainer):
        self.lrs[trainer.state.step] = trainer.last_step.lrs["group0"]


def test_resume_follows_the_configs_schedule_when_the_run_is_extended(train_workspace, tmp_path):
    """4 steps of cosine, then resumed to 8: the lr follows the 8-step cosine (as a straight 8-step run does)."""
    common = dict(lr_scheduler="cosine", lr_warmup_steps=1, save_state=True)
    run(train_workspace, tmp_path / "short", max_train_steps=4, **common)
    straight = LrRecorder()
    run(train_workspace, tmp_path / "straight", handlers=[straight], max_train_steps=8, **common)
    resumed = LrRecorder()
    state = tmp_path / "short" / "out" / "lora-step00000004-state"
    run(train_workspace, tmp_path / "resumed", handlers=[resumed], resume=str(state), max_train_steps=8, **common)
    assert sorted(resumed.lrs) == [5, 6, 7, 8]
    assert all(resumed.lrs[s] == pytest.approx(straight.lrs[s], rel=1e-12) for s in resumed.lrs)
    assert resumed.lrs[5] > 0
