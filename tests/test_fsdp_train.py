"""FSDP2 full fine-tuning on the CPU (gloo): 2 torchrun processes shard the tiny DiT, follow the 1-process full
fine-tune, export a DiT our loader reads, and resume bit for bit from a sharded state."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train_support import load, write_config
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError
from wantrainer.models.wan.loading import load_wan_dit

PROMPT = {"text": "a blue square", "width": 32, "height": 32, "frames": 1, "steps": 2, "seed": 9, "cfg_scale": 1.0,
          "sample_solver": "euler"}
ADAPTER_KEYS = ("network_dim", "network_alpha", "save_precision")
FULL = {"network_module": "full", "full_save_precision": "fp32", "full_save_comfyui_prefix": False,
        "log_with": "tensorboard", "learning_rate": 1e-3, "max_grad_norm": 0.5}


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def fsdp_config(ws, folder, batch_size, *, val=False, **values):
    """The 4 distinct training images, ``batch_size`` per process, a full fine-tune (without the LoRA keys); with
    ``val`` the 3 validation images in one batch (which does not split evenly over 2 processes)."""
    datasets = {"train": [{"image_directory": str(ws.train_media), "cache_directory": str(ws.train_cache),
                           "resolution": [64, 64], "batch_size": batch_size, "caption_dropout_rate": 0.3}]}
    config = ws.config(folder / "out", val=val, datasets=datasets, **{"max_train_steps": 4, **FULL, **values})
    for key in ADAPTER_KEYS:
        config.pop(key)
    return write_config(folder / "config.toml", config)


def torchrun(config, nproc=2, *, check=True):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "wantrainer.cli", "train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_fsdp_two_processes_follow_one_process_and_export_the_dit(train_workspace, tmp_path):
    # SGD: the step is linear in the gradient, so the runs differ by summation order only (Adam divides tiny
    # gradient elements by their own size and amplifies that noise)
    kit = train_workspace.kit
    sgd = dict(optimizer_type="torch.optim.SGD", learning_rate=0.05, gradient_checkpointing=True, val=True,
               validate_every_n_steps=2, sample_every_n_steps=4, sample_prompts=[PROMPT], vae=str(kit.vae),
               t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir))
    trainer = build_trainer(load(fsdp_config(train_workspace, tmp_path / "single", batch_size=2, **sgd)))
    assert trainer.train() == "completed"
    proc = torchrun(fsdp_config(train_workspace, tmp_path / "fsdp", batch_size=1, distributed_engine="fsdp",
                                save_every_n_steps=2, save_state=True, **sgd))
    # 1. each process holds about half of the trained parameters (FSDP shards every tensor on dim 0)
    held = re.search(r"FSDP shards of the (\d+) trained parameters: (\d+) / (\d+) elements", proc.stderr)
    assert held, proc.stderr[-3000:]
    total, first, second = map(int, held.groups())
    assert first + second == total == sum(p.numel() for p in trainer.model.parameters())
    assert 0.45 < first / total < 0.55 and 0.45 < second / total < 0.55, (first, second, total)
    # 2. the loss trajectory and the gradient norm follow the 1-process run with the same global batch
    one = scalars(tmp_path / "single" / "out" / "logs", "loss/current")
    two = scalars(tmp_path / "fsdp" / "out" / "logs", "loss/current")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    assert len({round(v, 6) for _, v in one}) == 4
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5), (one, two)  # measured: within 1.1e-7 (summation order)
    norm_one = scalars(tmp_path / "single" / "out" / "logs", "grad_norm")
    norm_two = scalars(tmp_path / "fsdp" / "out" / "logs", "grad_norm")
    assert [v for _, v in norm_two] == pytest.approx([v for _, v in norm_one], rel=1e-5)
    assert all(v > 0.5 for _, v in norm_one)  # clipping to max_grad_norm = 0.5 took part
    # every process validates on the whole val set (a sharded forward needs them all): the same mean
    val_one = scalars(tmp_path / "single" / "out" / "logs", "val/loss")
    val_two = scalars(tmp_path / "fsdp" / "out" / "logs", "val/loss")
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [2, 4]
    assert [v for _, v in val_two] == pytest.approx([v for _, v in val_one], rel=1e-5)
    # every process denoises the sample (a sharded forward needs them all), the main one writes it
    from PIL import Image

    sample = "sample/lora_step00000004_p00_s9.png"
    a = np.asarray(Image.open(tmp_path / "single" / "out" / sample), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "fsdp" / "out" / sample), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and a.std() > 0  # measured: equal
    # 3. the exported DiT: the original layout, loads in our loader, equals the 1-process fine-tune
    path = tmp_path / "fsdp" / "out" / "lora.safetensors"
    got, want = load_file(str(path)), load_file(str(tmp_path / "single" / "out" / "lora.safetensors"))
    assert got.keys() == want.keys() and "blocks.0.self_attn.q.weight" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)  # measured: 1.5e-8
    base = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(train_workspace.kit.dit_wan21)).items()}
    assert max(float((got[k] - base[k].float()).abs().max()) for k in got) > 1e-4  # it did train
    loaded = dict(load_wan_dit(path, dtype=torch.float32).named_parameters())
    assert all(torch.equal(loaded[k].detach(), got[k]) for k in loaded)
    # 4. the sharded state: one checkpoint file per process, no whole-network file
    state = tmp_path / "fsdp" / "out" / "lora-step00000002-state"
    names = {p.name for p in state.iterdir()}
    assert {"rank0.pt", "rank1.pt", "COMPLETE.json", "sharded"} <= names
    assert not any(n.startswith(("network_", "optimizer_")) for n in names)
    assert len(list((state / "sharded").glob("*.distcp"))) == 2
    assert json.loads((state / "trainer_state.json").read_text())["engine"] == "fsdp"
    # 5. the export equals the trained shards of the final state, consolidated offline from its 2 files
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    final = tmp_path / "fsdp" / "out" / "lora-step00000004-state" / "sharded"
    dcp_to_torch_save(final, tmp_path / "consolidated.pt")
    shards = torch.load(tmp_path / "consolidated.pt", weights_only=True)["model"]
    assert shards.keys() == got.keys() and all(torch.equal(shards[k], got[k]) for k in got)


@pytest.mark.slow
def test_fsdp_resume_is_bit_identical_and_needs_the_same_process_count(train_workspace, tmp_path):
    common = dict(distributed_engine="fsdp", save_every_n_steps=2, save_state=True, optimizer_type="adamw",
                  log_with="none")
    torchrun(fsdp_config(train_workspace, tmp_path / "a", batch_size=1, **common))
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    torchrun(fsdp_config(train_workspace, tmp_path / "b", batch_size=1, resume=str(state), **common))
    a = load_file(str(tmp_path / "a" / "out" / "lora.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = load_file(str(tmp_path / "a" / "out" / "lora-step00000002.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)
    # one process cannot take the 2 shards
    with pytest.raises(UserError, match="saved by 2 process"):
        build_trainer(load(fsdp_config(train_workspace, tmp_path / "c", batch_size=2, resume=str(state),
                                       **common))).train()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"network_module": "networks.lora_wan"}, 'set network_module = "full"'),
        ({"optimizer_type": "adamw8bit"}, "optimizer_type"),
        ({"optimizer_type": "adafactor"}, "optimizer_type"),  # measured: both Adafactors fail on DTensors
        ({"optimizer_type": "torch.optim.Adafactor"}, "optimizer_type"),
        ({"blocks_to_swap": 1}, "blocks_to_swap"),
        ({"fp8_base": True}, "fp8_base"),
    ],
)
def test_fsdp_config_mistakes(values, message):
    from wantrainer.config_parser import parse_config
    from wantrainer.errors import ConfigError

    values = {"network_module": "full", "distributed_engine": "fsdp", **values}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(values)


def test_lora_keeps_ddp_and_fsdp_with_one_process_is_the_plain_path():
    from accelerate import Accelerator

    from wantrainer.config_parser import parse_config
    from wantrainer.core.distributed import DataParallelEngine
    from wantrainer.core.fsdp import make_engine

    assert parse_config({}).training.distributed_engine == "ddp"
    assert isinstance(make_engine("fsdp", Accelerator(cpu=True)), DataParallelEngine)  # nothing to shard


def test_a_state_of_the_other_engine_is_refused(train_workspace, tmp_path):
    """A state folder records its engine: DDP's whole-network files and FSDP's shards do not mix."""
    common = dict(max_train_steps=2, save_every_n_steps=1, save_state=True, log_with="none")
    build_trainer(load(fsdp_config(train_workspace, tmp_path / "a", batch_size=2, **common))).train()
    state = tmp_path / "a" / "out" / "lora-step00000001-state"
    info = json.loads((state / "trainer_state.json").read_text())
    assert info["engine"] == "ddp"
    info["engine"] = "fsdp"  # as a 1-process run would see a sharded state of the same process count
    (state / "trainer_state.json").write_text(json.dumps(info))
    trainer = build_trainer(load(fsdp_config(train_workspace, tmp_path / "b", batch_size=2, resume=str(state),
                                             **common)))
    with pytest.raises(UserError, match='saved with distributed_engine = "fsdp" and this run uses "ddp"'):
        trainer.train()
