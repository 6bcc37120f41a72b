"""REPA / CREPA on the kit: encoder features cached by cache-latents (reused, stale when the encoder changes), the
alignment learnt (loss falls, cosine rises), teardown, off = baseline, resume, checkpointing / block swap, CREPA only
on video items."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from train_support import load, lora_tensors, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.errors import UserError


def repa_values(ws, out, cache, **overrides):
    kit = ws.kit
    values = ws.config(out, enable_repa=True, repa_encoder_name=str(kit.dinov2), repa_alignment_depth=0,
                       repa_projector_hidden_dim=64, repa_loss_lambda=1.0, vae=str(kit.vae), log_with="none",
                       **overrides)
    values["datasets"]["train"][0]["cache_directory"] = str(cache)
    return values


@pytest.fixture(scope="module")
def repa_cache(train_workspace, tmp_path_factory):
    """The workspace's train caches plus REPA features of the kit's tiny DINOv2 (written by cache-latents)."""
    root = tmp_path_factory.mktemp("repa")
    cache = shutil.copytree(train_workspace.train_cache, root / "cache")
    summary = cache_latents(load(write_config(root / "c.toml", repa_values(train_workspace, root / "o", cache))))
    return cache, summary


def run(ws, tmp, cache, handlers=(), **overrides):
    trainer = build_trainer(load(write_config(tmp / "c.toml", repa_values(ws, tmp / "out", cache, **overrides))),
                            extra_handlers=list(handlers))
    assert trainer.train() == "completed"
    return trainer


def fixed_eval(trainer, seed=123):
    """REPA cosine and loss over every batch at fixed noise and timesteps (the trainer's draws restored after)."""
    saved = trainer.noise_gen.get_state(), trainer.timestep_gen.get_state()
    cosines, losses = [], []
    repa = next(e for e in trainer.enhancements if e.name == "repa")
    for index, batch in enumerate(trainer.loader):
        trainer.noise_gen.manual_seed(seed + index)
        trainer.timestep_gen.manual_seed(seed + index)
        _, metrics = trainer.forward_backward(batch, trainer.experts.names[0])
        losses.append(metrics["repa/loss"])
        cosines.append(repa.get_repa_metrics()["cosine"])
    trainer._zero_grad()
    trainer.noise_gen.set_state(saved[0])
    trainer.timestep_gen.set_state(saved[1])
    return sum(cosines) / len(cosines), sum(losses) / len(losses)


def test_features_are_cached_reused_and_stale_when_the_encoder_changes(train_workspace, repa_cache, tmp_path):
    cache, summary = repa_cache
    assert summary.extras["repa_features"] == {"cached": 4, "skipped": 0, "stale": 0}
    files = sorted(cache.glob("*_wan_wtrepa.safetensors"))
    assert len(files) == 4
    with safe_open(str(files[0]), framework="pt") as f:
        meta, features = f.metadata(), f.get_tensor("repa_features")
    assert meta["repa_encoder"] == str(train_workspace.kit.dinov2) and meta["repa_image_size"] == "224"
    assert features.dtype == torch.float16 and features.shape[0] == 1 and features.shape[-1] == 32
    assert features.shape[1] * features.shape[2] in (224 // 14) ** 2 + torch.arange(-40, 40)  # about 16 x 16 tokens
    own = shutil.copytree(cache, tmp_path / "cache")
    values = repa_values(train_workspace, tmp_path / "o", own)
    again = cache_latents(load(write_config(tmp_path / "a.toml", values)))
    assert again.extras["repa_features"] == {"cached": 0, "skipped": 4, "stale": 0}  # reused (skip_existing)
    changed = cache_latents(load(write_config(tmp_path / "b.toml", {**values, "repa_encoder_image_size": 112})))
    assert changed.extras["repa_features"] == {"cached": 4, "skipped": 0, "stale": 4}
    with safe_open(str(own / files[0].name), framework="pt") as f:
        assert f.metadata()["repa_image_size"] == "112" and f.get_slice("repa_features").get_shape()[1] < 16
    with pytest.raises(UserError, match="_wtrepa.*cache-latents"):  # features of the other size are not trained on
        build_trainer(load(write_config(tmp_path / "t.toml", values)))


def test_an_encoder_that_is_not_cached_offline_is_a_clear_error(train_workspace, tmp_path):
    values = repa_values(train_workspace, tmp_path / "o", tmp_path / "cache")
    values["datasets"]["train"][0]["cache_directory"] = str(shutil.copytree(train_workspace.train_cache,
                                                                            tmp_path / "cache"))
    values["repa_encoder_name"] = "facebook/dinov2-no-such-model"
    with pytest.raises(UserError, match="repa_encoder_name.*facebook/dinov2-no-such-model.*huggingface-cli"):
        cache_latents(load(write_config(tmp_path / "c.toml", values)))
    values["repa_encoder_name"] = str(tmp_path / "missing" / "dinov2")
    with pytest.raises(UserError, match="no such folder"):
        cache_latents(load(write_config(tmp_path / "d.toml", values)))


def test_validate_says_cache_latents_needs_the_encoder(train_workspace, tmp_path):
    from wantrainer.preflight import command_problems

    values = repa_values(train_workspace, tmp_path / "o", train_workspace.train_cache)
    assert command_problems(load(write_config(tmp_path / "a.toml", values)), "cache-latents") == []
    for name, words in (("facebook/dinov2-no-such-model", "not in the local Hugging Face cache"),
                        (str(tmp_path / "nowhere"), "no such folder"), (str(tmp_path), "no config.json")):
        cfg = load(write_config(tmp_path / "b.toml", {**values, "repa_encoder_name": name}))
        problems = command_problems(cfg, "cache-latents")
        assert len(problems) == 1 and "repa_encoder_name" in problems[0] and words in problems[0]
        assert command_problems(cfg, "train") == []  # training reads the cached features only


def test_config_mistakes_name_the_key(train_workspace, tmp_path):
    from wantrainer.config_parser import ConfigError

    cache = train_workspace.train_cache
    for bad, key in (({"enable_repa": False}, "is set but `enable_repa` is false"),
                     ({"repa_encoder_name": ""}, "repa_encoder_name"),
                     ({"crepa_adjacent_tau": 2.0}, "crepa_enabled")):
        with pytest.raises(ConfigError, match=key):
            load(write_config(tmp_path / "c.toml", {**repa_values(train_workspace, tmp_path / "o", cache), **bad}))


def test_repa_learns_the_alignment_and_teardown_leaves_the_model_bit_identical(train_workspace, repa_cache,
                                                                                tmp_path, torch_one_thread):
    cache, _ = repa_cache
    cfg = load(write_config(tmp_path / "c.toml", repa_values(train_workspace, tmp_path / "out", cache,
                                                              max_train_steps=30, learning_rate=1e-2)))
    trainer = build_trainer(cfg)
    model = trainer.model
    before_cos, before_loss = fixed_eval(trainer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.blocks[0]._forward_hooks  # the tap
    assert trainer.train() == "completed"
    repa = trainer.enhancements[0]
    assert not model.blocks[0]._forward_hooks  # the tap came off at the end of training
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())  # the DiT itself, bit for bit
    lora = lora_tensors(tmp_path / "out" / "lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in lora)  # the projector is not in the LoRA file
    # measured on fixed batches, noise and timesteps before and after 30 steps
    from wantrainer.enhancements.repa.repa_helper import BlockTap

    repa.tap = BlockTap(model.blocks[0])  # tapped again to measure
    after_cos, after_loss = fixed_eval(trainer)
    repa.remove_hooks()
    print(f"REPA cosine {before_cos:.3f} -> {after_cos:.3f}, loss {before_loss:.3f} -> {after_loss:.3f}")
    assert after_cos > before_cos + 0.2 and after_loss < before_loss - 0.2


def test_repa_off_keeps_the_trajectory_and_a_zero_weight_changes_no_lora_weight(train_workspace, repa_cache,
                                                                                tmp_path):
    cache, _ = repa_cache
    values = repa_values(train_workspace, tmp_path / "base", cache, max_train_steps=3)
    off = {k: v for k, v in values.items() if not k.startswith("repa_") and k != "enable_repa"}
    build_trainer(load(write_config(tmp_path / "off.toml", off))).train()
    plain = train_workspace.config(tmp_path / "plain", max_train_steps=3, log_with="none")
    plain["datasets"]["train"][0]["cache_directory"] = str(cache)
    build_trainer(load(write_config(tmp_path / "plain.toml", plain))).train()
    zero = {**values, "repa_loss_lambda": 0.0, "output_dir": str(tmp_path / "zero")}
    build_trainer(load(write_config(tmp_path / "zero.toml", zero))).train()
    a, b, c = (lora_tensors(tmp_path / n / "lora.safetensors") for n in ("base", "plain", "zero"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    on = {**values, "output_dir": str(tmp_path / "on")}
    build_trainer(load(write_config(tmp_path / "on.toml", on))).train()
    d = lora_tensors(tmp_path / "on" / "lora.safetensors")
    assert any(not torch.equal(a[k], d[k]) for k in a)  # on, it changes the LoRA


def test_repa_resume_is_bit_identical(train_workspace, repa_cache, tmp_path):
    cache, _ = repa_cache
    common = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, learning_rate=1e-2)
    whole = run(train_workspace, tmp_path / "a", cache, **common)
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    resumed = run(train_workspace, tmp_path / "b", cache, resume=str(state), **common)
    a, b = (lora_tensors(tmp_path / n / "out" / "lora.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (t.enhancements[0].projector.state_dict() for t in (whole, resumed))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("memory", [dict(gradient_checkpointing=True), dict(blocks_to_swap=1),
                                    dict(gradient_checkpointing=True, blocks_to_swap=1)],
                         ids=["checkpointing", "block-swap", "both"])
def test_gradient_checkpointing_and_block_swap_give_the_same_losses(train_workspace, repa_cache, tmp_path, memory):
    cache, _ = repa_cache
    from wantrainer.core.handlers.base import Handler

    class Losses(Handler):
        name = "losses"

        def __init__(self):
            self.seen = []

        def on_step_end(self, trainer):
            self.seen.append((trainer.last_step.loss, trainer.last_step.metrics["repa/loss"]))

    plain, other = Losses(), Losses()
    run(train_workspace, tmp_path / "a", cache, [plain], max_train_steps=4, learning_rate=1e-2)
    run(train_workspace, tmp_path / "b", cache, [other], max_train_steps=4, learning_rate=1e-2, **memory)
    assert all(abs(r) > 1e-3 for _, r in plain.seen)
    for (la, ra), (lb, rb) in zip(plain.seen, other.seen):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6) and ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
    a, b = (lora_tensors(tmp_path / n / "out" / "lora.safetensors") for n in ("a", "b"))
    moved = max(float(a[k].abs().max()) for k in a if k.endswith("lora_up.weight"))  # up starts at 0
    assert moved > 1e-2 and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)  # rounding only


@pytest.fixture(scope="module")
def video_cache(train_workspace, tmp_path_factory):
    """One dataset of 2 images and 2 clips (5 frames: 2 latent frames) with REPA features."""
    from wantrainer.devkit.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("crepa")
    media = make_synthetic_dataset(root / "media", seed=5, num_images=2, num_videos=2, video_frames=(9, 13))
    kit = train_workspace.kit
    values = repa_values(train_workspace, root / "o", root / "cache", t5=str(kit.t5),
                         t5_tokenizer=str(kit.tokenizer_dir))
    values["datasets"] = {"train": [
        {"image_directory": str(media.image_dir), "cache_directory": str(root / "cache"), "resolution": [64, 64],
         "batch_size": 2},
        {"video_directory": str(media.video_dir), "cache_directory": str(root / "vcache"), "resolution": [64, 64],
         "batch_size": 2, "target_frames": [5]}]}
    cfg = load(write_config(root / "c.toml", values))
    cache_latents(cfg)
    cache_text(cfg)
    return values


def test_crepa_differs_from_repa_only_on_video_items(video_cache, tmp_path):
    losses = {}
    for name, extra in (("repa", {}), ("crepa", dict(crepa_enabled=True, crepa_lambda=1.0))):
        values = {**video_cache, **extra, "output_dir": str(tmp_path / name)}
        trainer = build_trainer(load(write_config(tmp_path / f"{name}.toml", values)))
        for index, batch in enumerate(trainer.loader):
            trainer.noise_gen.manual_seed(index)
            trainer.timestep_gen.manual_seed(index)
            loss, metrics = trainer.forward_backward(batch, trainer.experts.names[0])
            kind = "video" if batch["latents"].shape[2] > 1 else "image"
            losses.setdefault(name, {}).setdefault(kind, []).append((float(loss), metrics))
        trainer._zero_grad()
        trainer.remove_hooks()
    repa, crepa = losses["repa"], losses["crepa"]
    assert len(repa["image"]) == len(repa["video"]) == 1
    for (a, _), (b, m) in zip(repa["image"], crepa["image"]):
        assert a == b and m["crepa/loss"] == 0.0  # one latent frame: no neighbour, the same loss bit for bit
    for (a, ma), (b, mb) in zip(repa["video"], crepa["video"]):
        assert mb["crepa/loss"] < -1e-3 and b == pytest.approx(a + mb["crepa/loss"], rel=1e-5)
        assert ma["repa/loss"] == mb["repa/loss"]


def test_separate_wan22_loras_train_one_projector_each(train_workspace, repa_cache, tmp_path):
    """With dual_lora_mode = "separate" each expert's LoRA has its own projector in its own optimiser: a step of one
    expert moves that expert's projector only (the two DiTs' hidden states differ); resume restores both."""
    from wantrainer.core.handlers.base import Handler

    cache, _ = repa_cache
    kit = train_workspace.kit

    class Projectors(Handler):
        name = "projectors"

        def __init__(self):
            self.seen = []

        def on_step_end(self, trainer):
            repa = next(e for e in trainer.enhancements if e.name == "repa")
            self.seen.append((trainer.last_step.expert, {n: [p.detach().clone() for p in m.parameters()]
                                                         for n, m in repa.projectors.items()}))

    wan22 = dict(target_model="wan22", dit=str(kit.dit_wan22_low), dit_high_noise=str(kit.dit_wan22_high),
                 timestep_boundary=500, dual_lora_mode="separate", learning_rate=1e-2, max_train_steps=6,
                 save_every_n_steps=3, save_state=True)
    seen = Projectors()
    whole = run(train_workspace, tmp_path / "a", cache, [seen], **wan22)
    repa = whole.enhancements[0]
    assert sorted(repa.projectors) == ["high_noise", "low_noise"]
    initial = {n: [p.detach().clone() for p in m.parameters()] for n, m in
               build_trainer(load(write_config(tmp_path / "i.toml", repa_values(train_workspace, tmp_path / "i", cache,
                                                                                **wan22)))).enhancements[0]
               .projectors.items()}  # fmt: skip
    previous = initial
    experts = []
    for expert, now in seen.seen:
        experts.append(expert)
        for name in now:
            moved = any(not torch.equal(a, b) for a, b in zip(now[name], previous[name]))
            assert moved == (name == expert), (expert, name)
        previous = now
    assert sorted(set(experts)) == ["high_noise", "low_noise"]
    resumed = run(train_workspace, tmp_path / "b", cache, resume=str(tmp_path / "a" / "out" / "lora-step00000003-state"),
                  **wan22)
    for name, projector in repa.projectors.items():
        other = resumed.enhancements[0].projectors[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in projector.state_dict().items())


def test_validation_items_get_no_features(train_workspace, repa_cache, tmp_path):
    """Validation measures the flow loss alone: cache-latents writes REPA features for the train items only."""
    cache = shutil.copytree(repa_cache[0], tmp_path / "cache")
    val = shutil.copytree(train_workspace.val_cache, tmp_path / "val")
    values = repa_values(train_workspace, tmp_path / "o", cache)
    values["datasets"]["val"] = [{"image_directory": str(train_workspace.val_media), "cache_directory": str(val),
                                  "resolution": [64, 64], "batch_size": 3}]
    summary = cache_latents(load(write_config(tmp_path / "c.toml", values)))
    assert summary.extras["repa_features"] == {"cached": 0, "skipped": 4, "stale": 0}
    assert len(list(val.glob("*x*_wan.safetensors"))) == 3 and not list(val.glob("*_wtrepa*"))
