"""DDP on the CPU: a 2-process torchrun run trains, saves, and follows the 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from train_support import load, lora_tensors, write_config
from wantrainer.core.wan_network_trainer import build_trainer


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def torchrun_train(config):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "wantrainer.cli", "train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr


def assert_runs_match(single_out, ddp_out, steps):
    """A 2-process run equals the 1-process run of the same global batch: the loss at every step (1e-6) and the
    saved LoRA (1e-3 / 1e-4: Adam amplifies summation-order noise). Returns the 1-process losses."""
    one = scalars(single_out / "logs", "loss/current")
    two = scalars(ddp_out / "logs", "loss/current")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, steps + 1))
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    a = lora_tensors(single_out / "lora.safetensors")
    b = lora_tensors(ddp_out / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
    return one, a


def distinct_config(ws, folder, batch_size, *, num_repeats=1, val=False, **values):
    """The 4 distinct training images (3 epochs' worth of shuffles in 5 steps, captions dropped at random) and,
    with ``val``, 3 distinct validation images (the last global batch does not split over 2 processes: one takes
    it, the other none); ``batch_size`` per process for both."""
    datasets = {"train": [{"image_directory": str(ws.train_media), "cache_directory": str(ws.train_cache),
                           "resolution": [64, 64], "batch_size": batch_size, "num_repeats": num_repeats,
                           "caption_dropout_rate": 0.3}]}
    if val:
        folder.mkdir(parents=True, exist_ok=True)
        jsonl = folder / "val.jsonl"
        images = sorted(ws.val_media.glob("*.png"))[:3]
        assert len(images) == 3
        jsonl.write_text("".join(json.dumps({"image_path": str(p), "caption": p.with_suffix(".txt").read_text()})
                                 + "\n" for p in images))
        datasets["val"] = [{"image_jsonl_file": str(jsonl), "cache_directory": str(ws.val_cache),
                            "resolution": [64, 64], "batch_size": batch_size}]
        values.update(validate_every_n_steps=5)
    values = ws.config(folder / "out", max_train_steps=5, learning_rate=1e-2, datasets=datasets,
                       lr_scheduler="linear", **values)
    return write_config(folder / "config.toml", values)


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(train_workspace, tmp_path):
    single = distinct_config(train_workspace, tmp_path / "single", batch_size=2, val=True)
    assert build_trainer(load(single)).train() == "completed"
    torchrun_train(distinct_config(train_workspace, tmp_path / "ddp", batch_size=1, val=True))

    one, a = assert_runs_match(tmp_path / "single" / "out", tmp_path / "ddp" / "out", steps=5)
    assert len({round(v, 6) for _, v in one}) == 5  # distinct images: the batches differ from step to step
    val_one = scalars(tmp_path / "single" / "out" / "logs", "val/loss")
    val_two = scalars(tmp_path / "ddp" / "out" / "logs", "val/loss")
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [5]
    assert val_two[0][1] == pytest.approx(val_one[0][1], rel=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_up" in k)


@pytest.mark.slow
def test_two_process_resume_is_bit_identical(train_workspace, tmp_path):
    common = dict(save_every_n_steps=2, save_state=True, num_repeats=2)  # 4 steps per epoch: saved mid-epoch
    torchrun_train(distinct_config(train_workspace, tmp_path / "a", batch_size=1, **common))
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    assert {"rank0.pt", "rank1.pt", "COMPLETE.json"} <= {p.name for p in state.iterdir()}
    torchrun_train(distinct_config(train_workspace, tmp_path / "b", batch_size=1, resume=str(state), **common))
    a = lora_tensors(tmp_path / "a" / "out" / "lora.safetensors")
    b = lora_tensors(tmp_path / "b" / "out" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_ema_matches_one_process(train_workspace, tmp_path):
    """The EMA follows the weights, which are the same on every process: 2 processes x 1 = 1 process x 2."""
    ema = dict(enable_ema=True, ema_decay=0.6, log_with="none")
    assert build_trainer(load(distinct_config(train_workspace, tmp_path / "single", batch_size=2, **ema))).train() \
        == "completed"
    torchrun_train(distinct_config(train_workspace, tmp_path / "ddp", batch_size=1, **ema))
    a = lora_tensors(tmp_path / "single" / "out" / "lora-ema.safetensors")
    b = lora_tensors(tmp_path / "ddp" / "out" / "lora-ema.safetensors")
    final = lora_tensors(tmp_path / "single" / "out" / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
    assert any(not torch.allclose(a[k], final[k]) for k in a if "lora_up" in k)
