"""The LoRA file written by `train` loads through diffusers' Wan loader and matches our model with the LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from train_support import load
from wantrainer.config.training import NetworkConfig
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.models.wan.loading import load_wan_dit
from wantrainer.networks.lora_wan import create_network

pytest.importorskip("peft")  # diffusers injects LoRA layers through peft


def test_trained_lora_file_matches_in_diffusers(train_workspace, tmp_path):
    from diffusers import WanPipeline

    from diffusers_support import diffusers_twin, random_inputs, twin_output

    cfg = load(train_workspace.write(tmp_path, max_train_steps=3, learning_rate=5e-2, log_with="none"))
    build_trainer(cfg).train()
    path = tmp_path / "out" / "lora.safetensors"

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "3" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert meta["ss_base_model_name"] == train_workspace.kit.dit_wan21.name and "ss_base_model_hash" in meta
    assert "max_train_steps = 3" in meta["ss_config_toml"] and meta["modelspec.resolution"] == "64x64"

    dit = load_wan_dit(train_workspace.kit.dit_wan21, dtype=torch.float32).eval()
    reference = diffusers_twin(dit)
    base_twin = diffusers_twin(dit)
    network = create_network(NetworkConfig(network_dim=4, network_alpha=4.0, network_weights=path), dit)
    network.apply_to(dit)
    network.eval()
    WanPipeline.load_lora_into_transformer(WanPipeline.lora_state_dict(str(path)), transformer=reference)

    x, t, ctx = random_inputs(3, (2, 16, 1, 8, 8), [200.0, 700.0], [5, 9])
    with torch.no_grad():
        ours = dit(x, t, ctx)
    theirs = twin_output(reference, x, t, ctx)
    base = twin_output(base_twin, x, t, ctx)
    assert (ours - base).abs().max().item() > 1e-3  # the trained LoRA changes the output
    assert (ours - theirs).abs().max().item() < 1e-4
