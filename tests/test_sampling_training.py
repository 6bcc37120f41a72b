"""Samples during training and ``wantrainer sample`` on the tiny kit: files, sizes, reproducibility, the LoRA."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from train_support import load, lora_tensors
from wantrainer.cli import main as cli_main
from wantrainer.core.handlers.sampling import SamplingHandler, preview_image
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.sampling.writers import read_video_frames

PROMPTS = [
    {"text": "a red circle moves left", "negative_prompt": "blurry", "width": 64, "height": 48, "frames": 5,
     "steps": 3, "seed": 5, "cfg_scale": 4.0, "sample_solver": "unipc"},
    {"text": "a blue square", "width": 32, "height": 32, "frames": 1, "steps": 2, "seed": 9, "cfg_scale": 1.0,
     "sample_solver": "euler", "discrete_flow_shift": 3.0},
]


def _sampling_values(kit, **extra):
    return {"t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir), "vae": str(kit.vae),
            "sample_prompts": PROMPTS, "learning_rate": 2e-2, "max_train_steps": 2, **extra}


def _handler(trainer) -> SamplingHandler:
    return next(h for h in trainer.handlers if isinstance(h, SamplingHandler))


@pytest.fixture(scope="module")
def sampled_run(train_workspace, tmp_path_factory):
    """Three steps (two batches an epoch): samples at step 0 (first), 2 (epoch end) and 3 (every 3 steps).

    Returns (trainer, handler, out_dir, cfg path)."""
    tmp = tmp_path_factory.mktemp("sampled_run")
    path = train_workspace.write(tmp, **_sampling_values(train_workspace.kit, sample_at_first=True,
                                                         sample_every_n_steps=3, sample_every_n_epochs=1,
                                                         max_train_steps=3, network_dropout=0.1))
    trainer = build_trainer(load(path))
    assert trainer.train() == "completed"
    return trainer, _handler(trainer), tmp / "out", path


def test_sample_files_have_the_asked_size_and_frames(sampled_run):
    _, _, out, _ = sampled_run
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert names == [
        "lora_step00000000_p00_s5.mp4", "lora_step00000000_p01_s9.png",
        "lora_step00000002_p00_s5.mp4", "lora_step00000002_p01_s9.png",
        "lora_step00000003_p00_s5.mp4", "lora_step00000003_p01_s9.png",
    ]
    with av.open(str(out / "sample" / names[4])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        assert stream.average_rate == Fraction(16, 1)
    assert read_video_frames(out / "sample" / names[4]).shape == (5, 48, 64, 3)
    with Image.open(out / "sample" / names[5]) as img:
        assert img.size == (32, 32)


def test_samples_are_logged_to_tensorboard(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out, _ = sampled_run
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert {"sample/p00", "sample/p01"} <= set(events.Tags()["images"])
    first = events.Images("sample/p00")
    assert [e.step for e in first] == [0, 2, 3]
    assert (first[0].width, first[0].height) == (3 * 64, 48)  # first, middle and last frame side by side


def test_same_seed_and_weights_give_identical_frames_and_the_lora_is_active(sampled_run):
    trainer, handler, out, _ = sampled_run
    handler._last_step = None
    again = handler.sample(trainer)  # same weights as the step-3 samples, same seeds
    at_three = read_video_frames(out / "sample" / "lora_step00000003_p00_s5.mp4")
    assert np.array_equal(read_video_frames(again[0].path), at_three)
    with Image.open(out / "sample" / "lora_step00000003_p01_s9.png") as img:
        assert np.array_equal(np.asarray(img), again[1].frames[0])
    # the trained LoRA changes the output: step 0 (LoRA up = 0) differs from step 3
    at_zero = read_video_frames(out / "sample" / "lora_step00000000_p00_s5.mp4")
    assert not np.array_equal(at_zero, at_three)
    # modes restored after sampling
    assert trainer.model.training and all(n.training for n in trainer.networks.values())


def test_sampling_leaves_the_training_trajectory_alone(sampled_run, train_workspace, tmp_path):
    _, _, out, _ = sampled_run
    path = train_workspace.write(tmp_path, learning_rate=2e-2, max_train_steps=3, network_dropout=0.1)
    assert build_trainer(load(path)).train() == "completed"
    plain, sampled = lora_tensors(tmp_path / "out" / "lora.safetensors"), lora_tensors(out / "lora.safetensors")
    assert plain.keys() == sampled.keys()
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)


def test_sample_command_reproduces_the_training_samples(sampled_run, tmp_path):
    _, _, out, cfg_path = sampled_run
    dest = tmp_path / "cli"
    code = cli_main(["sample", "--config", str(cfg_path), "--lora", str(out / "lora.safetensors"),
                     "--output-dir", str(dest)])
    assert code == 0
    assert sorted(p.name for p in dest.iterdir()) == ["lora_m1_p00_s5.mp4", "lora_m1_p01_s9.png"]
    # merged LoRA (standalone) vs wrapped LoRA (training): the same frames up to rounding
    with Image.open(dest / "lora_m1_p01_s9.png") as a, Image.open(out / "sample" / "lora_step00000003_p01_s9.png") as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1
    video = read_video_frames(dest / "lora_m1_p00_s5.mp4").astype(np.int16)
    trained = read_video_frames(out / "sample" / "lora_step00000003_p00_s5.mp4").astype(np.int16)
    assert np.abs(video - trained).mean() < 0.5
    # --multiplier 0 is the base model: the step-0 samples
    base = tmp_path / "base"
    assert cli_main(["sample", "--config", str(cfg_path), "--lora", str(out / "lora.safetensors"),
                     "--multiplier", "0", "--output-dir", str(base)]) == 0
    zero = read_video_frames(out / "sample" / "lora_step00000000_p00_s5.mp4").astype(np.int16)
    assert np.abs(read_video_frames(base / "lora_m0_p00_s5.mp4").astype(np.int16) - zero).mean() < 0.5
    # --prompt replaces the [[sample_prompts]] texts, keeping the first table's size, frames, steps and seed
    typed = tmp_path / "typed"
    assert cli_main(["sample", "--config", str(cfg_path), "--lora", str(out / "lora.safetensors"),
                     "--prompt", PROMPTS[0]["text"], "--prompt", "a green triangle", "--output-dir", str(typed)]) == 0
    assert sorted(p.name for p in typed.iterdir()) == ["lora_m1_p00_s5.mp4", "lora_m1_p01_s5.mp4"]
    same = read_video_frames(typed / "lora_m1_p00_s5.mp4").astype(np.int16)
    other = read_video_frames(typed / "lora_m1_p01_s5.mp4").astype(np.int16)
    assert same.shape == other.shape == video.shape and np.abs(same - video).max() == 0
    assert np.abs(other - video).mean() > 1.0


def test_sample_command_user_errors(train_workspace, tmp_path, capsys):
    path = train_workspace.write(tmp_path)
    assert cli_main(["sample", "--config", str(path)]) == 2
    assert "no [[sample_prompts]]" in capsys.readouterr().err
    path = train_workspace.write(tmp_path, **_sampling_values(train_workspace.kit))
    assert cli_main(["sample", "--config", str(path), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_triggers_need_prompts_and_models(train_workspace, tmp_path):
    with pytest.raises(UserError, match="sample_prompts"):
        load(train_workspace.write(tmp_path, sample_every_n_steps=1))
    values = _sampling_values(train_workspace.kit, sample_every_n_epochs=1)
    del values["vae"]
    with pytest.raises(UserError, match="`vae`"):
        build_trainer(load(train_workspace.write(tmp_path, **values)))


def test_preview_image_layout():
    frames = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    strip = preview_image(frames)
    assert strip.shape == (2, 9, 3)
    assert np.array_equal(strip[:, 3:6], frames[2])
    assert preview_image(frames[:1]).shape == (2, 3, 3)


def test_sample_at_first_does_not_resample_a_resumed_run(train_workspace, tmp_path):
    first = train_workspace.write(tmp_path / "a", max_train_steps=2, save_every_n_steps=1, save_state=True,
                                  log_with="none")
    assert build_trainer(load(first)).train() == "completed"
    state = tmp_path / "a" / "out" / "lora-step00000001-state"
    resumed = train_workspace.write(tmp_path / "b", **_sampling_values(
        train_workspace.kit, sample_at_first=True, max_train_steps=2, resume=str(state), log_with="none",
        sample_prompts=PROMPTS[1:]))
    trainer = build_trainer(load(resumed))
    assert trainer.train() == "completed"
    assert _handler(trainer).written == [] and not (tmp_path / "b" / "out" / "sample").exists()
