"""Differential output preservation: class prompts cached by cache-text, and the class-word prediction drifts less."""

from __future__ import annotations

import shutil

import pytest
import torch

from train_support import TrainWorkspace, load, lora_tensors
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.config_parser import ConfigError
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.dataset.cache_format import load_text_cache
from wantrainer.enhancements.base import network_disabled
from wantrainer.enhancements.dop.dop_helper import class_caption
from wantrainer.errors import UserError

DOP = dict(enable_dop=True, dop_trigger_word="sks", dop_class_word="shape")
DRIFT_RATIO = 0.25
"""With DOP (dop_weight 4, 8 steps) the class-word drift must be under a quarter of the drift without it (on the kit
it is 3 %: 3.2e-3 against 1.07e-1; with dop_weight 1, 47 %)."""


@pytest.fixture(scope="module")
def dop_workspace(train_workspace, tmp_path_factory):
    """The train images with "sks" in three of the four captions, their latents reused, texts cached with DOP."""
    root = tmp_path_factory.mktemp("dop_workspace")
    ws = TrainWorkspace.__new__(TrainWorkspace)
    ws.kit, ws.root = train_workspace.kit, root
    ws.val_media, ws.val_cache = train_workspace.val_media, train_workspace.val_cache
    ws.train_media = shutil.copytree(train_workspace.train_media, root / "media")
    ws.train_cache = root / "cache"
    ws.train_cache.mkdir()
    for latent in train_workspace.train_cache.glob("*_wan.safetensors"):
        shutil.copy(latent, ws.train_cache / latent.name)
    for i, caption in enumerate(sorted(ws.train_media.glob("*.txt"))):
        if i < 3:
            caption.write_text("a sks " + caption.read_text().removeprefix("a "))
    kit = ws.kit
    cfg = load(ws.write(root / "encode", t5=str(kit.t5), t5_tokenizer=str(kit.tokenizer_dir), **DOP))
    summary = cache_text(cfg)
    assert not summary.failed
    return ws


def test_class_caption_replaces_the_whole_word_only():
    assert class_caption("a sks dog, sks!", "sks", "dog") == "a dog dog, dog!"
    assert class_caption("a sksy dog", "sks", "dog") is None
    assert class_caption("photo of sks", "sks", "") == "photo of"


def test_cache_text_writes_class_prompts_for_trigger_captions(dop_workspace, tmp_path):
    cache = dop_workspace.train_cache
    dop = sorted(cache.glob("*_wan_te_wtdop.safetensors"))
    assert len(dop) == 3 and len(list(cache.glob("*_wan_te.safetensors"))) == 4
    from safetensors import safe_open

    with safe_open(str(dop[0]), framework="pt") as f:
        assert "shape" in f.metadata()["caption1"] and "sks" not in f.metadata()["caption1"]
    plain = dop[0].with_name(dop[0].name.replace("_wtdop", ""))
    assert not torch.equal(load_text_cache(dop[0]), load_text_cache(plain))


def _drift(trainer) -> float:
    """Mean squared difference of the LoRA-on and LoRA-off predictions on the class prompts (fixed noise, t=500)."""
    model, network = trainer.model, trainer.networks["default"]
    from wantrainer.dataset.cache_format import load_latent_cache

    total = []
    for item in trainer.loader.items:
        path = dict(item.extra_paths).get("dop_text")
        if path is None:
            continue
        latents, _ = load_latent_cache(item.latent_path)
        x0 = latents.float()[None]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        x = 0.5 * x0 + 0.5 * noise
        text = [load_text_cache(path).float()]
        with torch.no_grad():
            on = trainer.call_model(model, x, torch.tensor([500.0]), text)
            with network_disabled(network):
                off = trainer.call_model(model, x, torch.tensor([500.0]), text)
        total.append(float((on - off).square().mean()))
    assert len(total) == 3
    return sum(total) / len(total)


def test_dop_keeps_the_class_word_prediction_near_the_base(dop_workspace, tmp_path):
    common = dict(max_train_steps=8, learning_rate=3e-2, log_with="none")
    plain = build_trainer(load(dop_workspace.write(tmp_path / "plain", **common)))
    assert plain.train() == "completed"
    dop = build_trainer(load(dop_workspace.write(tmp_path / "dop", dop_weight=4.0, **DOP, **common)))
    assert dop.train() == "completed"
    assert dop.last_step.metrics["dop/drift"] > 0 and "dop/loss" in dop.last_step.metrics
    dop_drift = _drift(dop)
    # the plain run's loader has no DOP caches: measure its LoRA on the DOP run's items
    plain_lora = lora_tensors(tmp_path / "plain" / "out" / "lora.safetensors")
    network = dop.networks["default"]
    network.load_state_dict(plain_lora, strict=False)
    plain_drift = _drift(dop)
    print(f"class-word drift: {dop_drift:.3e} with DOP, {plain_drift:.3e} without")
    assert dop_drift < DRIFT_RATIO * plain_drift, (dop_drift, plain_drift)


def test_blank_prompt_variant_needs_no_cache(train_workspace, tmp_path):
    trainer = build_trainer(load(train_workspace.write(tmp_path, max_train_steps=2, enable_dop=True,
                                                       dop_prompt="blank", log_with="none")))
    assert trainer.train() == "completed"
    assert trainer.last_step.metrics["dop/loss"] > 0


def test_missing_class_prompts_and_bad_keys_are_user_errors(train_workspace, tmp_path):
    with pytest.raises(UserError, match="cache-text"):
        build_trainer(load(train_workspace.write(tmp_path, max_train_steps=2, log_with="none", **DOP)))
    with pytest.raises(ConfigError, match="dop_trigger_word"):
        load(train_workspace.write(tmp_path, enable_dop=True))
    with pytest.raises(ConfigError, match="enable_dop"):
        load(train_workspace.write(tmp_path, dop_weight=2.0))


@pytest.mark.slow
def test_two_process_dop_matches_one_process(dop_workspace, tmp_path):
    from test_ddp_train import distinct_config, torchrun_train

    values = dict(log_with="none", **DOP)
    single = build_trainer(load(distinct_config(dop_workspace, tmp_path / "single", batch_size=2, **values)))
    assert single.train() == "completed"
    torchrun_train(distinct_config(dop_workspace, tmp_path / "ddp", batch_size=1, **values))
    a = lora_tensors(tmp_path / "single" / "out" / "lora.safetensors")
    b = lora_tensors(tmp_path / "ddp" / "out" / "lora.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)


def test_dop_resume_is_bit_identical(dop_workspace, tmp_path):
    common = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, log_with="none", **DOP)
    assert build_trainer(load(dop_workspace.write(tmp_path / "a", **common))).train() == "completed"
    state = tmp_path / "a" / "out" / "lora-step00000002-state"
    resumed = build_trainer(load(dop_workspace.write(tmp_path / "b", resume=str(state), **common)))
    assert resumed.train() == "completed"
    a, b = (lora_tensors(tmp_path / n / "out" / "lora.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
