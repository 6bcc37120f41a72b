"""Image-to-video training proofs on the kit: the held-out loss falls for every I2V model type, a resumed run is
bit-identical, DDP with 2 processes follows 1 process, the Wan 2.2 I2V experts train their own LoRAs."""

from __future__ import annotations

import pytest
import torch

from test_ddp_train import assert_runs_match, torchrun_train
from test_resume import assert_same_lora
from test_wan22_train import Snapshots
from train_support import load
from wantrainer.core.handlers.validation import ValidationHandler
from wantrainer.core.wan_network_trainer import build_trainer

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LEARN_STEPS = 30
LEARN_MARGIN = 0.05


@pytest.mark.parametrize("model_type", ["i2v", "flf2v", "i2v_a14b"])
def test_learning_proof_heldout_loss_falls(i2v_workspace, tmp_path, model_type):
    cfg = load(i2v_workspace.write(model_type, tmp_path, val=True, max_train_steps=LEARN_STEPS, learning_rate=1e-2,
                                   network_dim=8, network_alpha=8.0, validate_on_epoch_end=True, log_with="none"))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)  # held-out clips with their conditioning, fixed noise, timesteps 100..900
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    assert after["val/loss"] < (1 - LEARN_MARGIN) * before["val/loss"], (before, after)


def test_the_conditioning_reaches_the_loss(i2v_workspace, tmp_path):
    """Another conditioning (the image latents zeroed) gives another validation loss: it is not ignored."""
    cfg = load(i2v_workspace.write("i2v", tmp_path, val=True, validate_on_epoch_end=True, log_with="none"))
    trainer = build_trainer(cfg)
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    real = probe.evaluate(trainer)["val/loss"]
    batches = probe._batches

    def zeroed():
        for batch in batches():
            batch["conditioning"]["y"][:, 4:] = 0
            yield batch

    probe._batches = zeroed
    assert abs(probe.evaluate(trainer)["val/loss"] - real) > 1e-4


def test_i2v_resume_is_bit_identical(i2v_workspace, tmp_path):
    common = dict(max_train_steps=6, lr_scheduler="linear", lr_warmup_steps=2, save_every_n_steps=3,
                  save_state=True, log_with="none")
    build_trainer(load(i2v_workspace.write("flf2v", tmp_path / "a", **common))).train()
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    resumed = build_trainer(load(i2v_workspace.write("flf2v", tmp_path / "b", resume=str(state), **common)))
    assert resumed.train() == "completed" and resumed.state.step == 6
    assert_same_lora(tmp_path / "a" / "out" / "lora.safetensors", tmp_path / "b" / "out" / "lora.safetensors")


@pytest.mark.slow
def test_i2v_two_process_run_matches_one_process(i2v_workspace, tmp_path):
    video_only = lambda batch: {"train": [{**i2v_workspace.config("i2v", tmp_path)["datasets"]["train"][0],  # noqa: E731
                                           "batch_size": batch}]}
    single = i2v_workspace.write("i2v", tmp_path / "single", max_train_steps=4, datasets=video_only(2))
    assert build_trainer(load(single)).train() == "completed"
    torchrun_train(i2v_workspace.write("i2v", tmp_path / "ddp", max_train_steps=4, datasets=video_only(1)))
    assert_runs_match(tmp_path / "single" / "out", tmp_path / "ddp" / "out", steps=4)


def test_wan22_i2v_separate_loras_train_on_their_own_steps_with_the_i2v_boundary(i2v_workspace, tmp_path):
    kit = i2v_workspace.kit
    cfg = load(i2v_workspace.write("i2v_a14b", tmp_path, target_model="wan22", dit=str(kit.dit_wan22_i2v_low),
                                   dit_high_noise=str(kit.dit_wan22_i2v_high), dual_lora_mode="separate",
                                   max_train_steps=8, log_with="none"))
    snaps = Snapshots()
    trainer = build_trainer(cfg, extra_handlers=[snaps])
    assert trainer.experts.boundary == pytest.approx(0.9)  # the I2V A14B default, not T2V's 0.875
    trainer.train()
    experts = [e for e, _ in snaps.steps]
    assert set(experts) == {"high_noise", "low_noise"}
    previous = snaps.initial
    for expert, weights in snaps.steps:
        other = "low_noise" if expert == "high_noise" else "high_noise"
        assert any(not torch.equal(weights[expert][k], previous[expert][k]) for k in weights[expert])
        assert all(torch.equal(weights[other][k], previous[other][k]) for k in weights[other])
        previous = weights
    for expert in ("high_noise", "low_noise"):
        assert (tmp_path / "out" / f"lora_{expert}.safetensors").is_file()
