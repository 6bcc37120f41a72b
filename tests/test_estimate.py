"""`wantrainer estimate`: the terms follow the settings, the activation coefficients match what autograd saves,
and the RAM estimate of a CPU run is within 15 % of its measured peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from train_support import write_config
from wantrainer.cli import main
from wantrainer.config import NetworkConfig
from wantrainer.config_parser import load_config
from wantrainer.estimate.cli import fitting_steps, knobs_from_config, largest_batch_tokens
from wantrainer.estimate.terms import (
    ACT_PER_TEXT_TOKEN_DIM,
    ACT_PER_TOKEN_DIM,
    ACT_PER_TOKEN_FFN,
    FORKSERVER_BYTES,
    WORKER_BYTES,
    GiB,
    estimate,
    model_shapes,
)
from wantrainer.models.wan.configs import WAN_CONFIGS, WanModelConfig

# The peak of this process's own memory (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak over
# into the child through vfork + exec (subprocess uses vfork), so a child of a 1 GB pytest reports >= 1 GB.
_MEASURE = """
import sys
from wantrainer.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("MAXRSS_KB", hwm.split()[1])
sys.exit(code)
"""


def _saved_block_bytes(dim: int, ffn: int, frames: int, size: int) -> tuple[int, int]:
    """(video tokens, bytes autograd saves for one LoRA-wrapped block), parameters not counted."""
    from wantrainer.models.wan.transformer import WanModel
    from wantrainer.networks.lora_wan import create_network

    def run(layers: int) -> int:
        torch.manual_seed(0)
        model = WanModel(WanModelConfig(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=layers, text_dim=64))
        model.requires_grad_(False)
        network = create_network(NetworkConfig(network_dim=8, network_alpha=8), model)
        network.apply_to(model)
        params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *network.parameters()]}
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.randn(1, 16, frames, size, size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, torch.tensor([500.0]), [torch.randn(7, 64)])
        return sum(seen.values())

    tokens = frames * (size // 2) ** 2  # x is the latent: frames are latent frames
    return tokens, run(2) - run(1)


@pytest.mark.parametrize("dim, ffn, frames, size", [(256, 512, 5, 16), (256, 1024, 3, 32), (512, 768, 1, 32)])
def test_activation_coefficients_match_autograd(dim, ffn, frames, size, torch_one_thread):
    tokens, measured = _saved_block_bytes(dim, ffn, frames, size)
    predicted = tokens * (ACT_PER_TOKEN_DIM * dim + ACT_PER_TOKEN_FFN * ffn) + 512 * ACT_PER_TEXT_TOKEN_DIM * dim
    assert abs(predicted - measured) / measured < 0.1, (predicted, measured)


def _knobs(**changes):
    from wantrainer.estimate.terms import Knobs

    base = Knobs(compute="bf16", fp8=False, fp8_scaled=False, blocks_to_swap=0, gradient_checkpointing=False,
                 cpu_offload=False, optimizer="adamw", experts=1, offload_inactive=True, separate_loras=False,
                 tokens=21 * 30 * 52, batch=1, device="cuda")
    return base.with_(**changes)


def test_terms_follow_the_settings():
    net = NetworkConfig(network_dim=32, network_alpha=32)
    shapes = model_shapes(WAN_CONFIGS["wan21_t2v_14b"], net, _knobs(), None, "14b")
    fp8 = model_shapes(WAN_CONFIGS["wan21_t2v_14b"], net, _knobs(fp8=True), None, "14b")
    # 14.29 B parameters: bf16 blocks ~2 bytes each, fp8 blocks ~1 byte each (non-block layers stay bf16 / fp32)
    assert 26.0 < (shapes.block_bytes * 40 + shapes.other_bytes) / GiB < 27.5
    assert 13.0 < (fp8.block_bytes * 40 + fp8.other_bytes) / GiB < 14.5
    assert shapes.lora_params == 153_354_240  # rank 32 on the 400 block Linears
    plain = estimate(shapes, _knobs())
    checkpointed = estimate(shapes, _knobs(gradient_checkpointing=True))
    swapped = estimate(shapes, _knobs(gradient_checkpointing=True, blocks_to_swap=20))
    assert checkpointed.vram < plain.vram / 5
    blocks_moved = 19 * shapes.block_bytes  # 20 swapped, one of them in flight on the GPU
    assert checkpointed.vram - swapped.vram == blocks_moved and swapped.train_ram - checkpointed.train_ram == 20 * shapes.block_bytes
    eight_bit = estimate(shapes, _knobs(gradient_checkpointing=True, optimizer="adamw8bit"))
    assert checkpointed.vram - eight_bit.vram == shapes.lora_params * 6
    fits = fitting_steps(lambda k: model_shapes(WAN_CONFIGS["wan21_t2v_14b"], net, k, None, "14b"), _knobs(), 24 * GiB)
    assert fits[0][0] == "gradient_checkpointing = true" and fits[-1][1].vram <= 24 * GiB
    # the fp8 step re-counts the weights: the blocks drop from 2 bytes a parameter to ~1
    (_, after_gc), (fp8_text, after_fp8) = fits[0], fits[1]
    assert fp8_text.startswith("dit_weight_dtype") and after_gc.vram - after_fp8.vram > 12 * GiB
    two = estimate(shapes, _knobs(experts=2, gradient_checkpointing=True))
    assert two.vram == checkpointed.vram and two.train_ram - checkpointed.train_ram == shapes.block_bytes * 40 + shapes.other_bytes
    # data-loader workers: their forkserver and each worker in RAM (PSS measured at 1.3B)
    workers = estimate(shapes, _knobs(gradient_checkpointing=True, workers=2))
    assert workers.train_ram - checkpointed.train_ram == FORKSERVER_BYTES + 2 * WORKER_BYTES
    # on the CPU the allocator's slack is named, not counted, unless release_freed_memory returns it
    cpu = [t.name for t in estimate(shapes, _knobs(device="cpu")).terms]
    released = [t.name for t in estimate(shapes, _knobs(device="cpu", release_freed_memory=True)).terms]
    assert "allocator slack (not counted)" in cpu and "allocator slack (not counted)" not in released
    jemalloc = estimate(shapes, _knobs(device="cpu", allocator="jemalloc"))  # reuses them: no slack
    assert "allocator slack (not counted)" not in [t.name for t in jemalloc.terms]
    assert jemalloc.train_ram == estimate(shapes, _knobs(device="cpu")).train_ram


def test_estimate_command(tiny_kit, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", {
        "dit": str(tiny_kit.dit_wan21), "t5": str(tiny_kit.t5),
        "datasets": {"train": [{"video_directory": str(tmp_path), "resolution": [832, 480], "target_frames": [81]}]}})
    assert main(["estimate", "--config", str(config), "--model", "wan21_t2v_14b", "--vram", "24"]) == 0
    out = capsys.readouterr().out
    assert "32760 tokens" in out and "does not fit in 24 GB" in out and "blocks_to_swap" in out
    assert main(["estimate", "--config", str(config), "--resolution", "512x512", "--frames", "1"]) == 0
    out = capsys.readouterr().out
    assert "1024 tokens" in out and "fits in" not in out and "DiT weights" in out
    cfg = load_config(config)
    assert largest_batch_tokens(cfg, None, None)[0] == 21 * 30 * 52


@pytest.mark.slow
def test_ram_estimate_of_a_cpu_run_is_within_15_percent(train_workspace, tmp_path):
    values = train_workspace.config(tmp_path / "out", max_train_steps=3, log_with="none")
    config = write_config(tmp_path / "c.toml", values)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _MEASURE, "train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = int(done.stdout.split("MAXRSS_KB")[1].split()[0]) * 1024
    cfg = load_config(config)
    tokens, batch, _ = largest_batch_tokens(cfg, None, None)
    knobs = knobs_from_config(cfg, "cpu", tokens, batch, 1)
    shapes = model_shapes(_tiny_config(train_workspace.kit.dit_wan21), cfg.network, knobs,
                          train_workspace.kit.dit_wan21.stat().st_size, "tiny")
    predicted = estimate(shapes, knobs).ram
    assert abs(predicted - measured) / measured < 0.15, (predicted / GiB, measured / GiB)


def _tiny_config(path):
    from wantrainer.models.wan.loading import infer_wan_config, read_tensor_index

    return infer_wan_config({k: v.shape for k, v in read_tensor_index([path]).items()})
