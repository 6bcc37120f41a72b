"""TI2V-5B caching and training on the kit's 48-channel DiT and Wan 2.2 VAE: 48-channel caches at 16x with the VAE
recorded, buckets in multiples of 32, a cache of the other VAE refused with the command to run, the image-to-video
objective (clean first frame at timestep 0, out of the loss), learning, resume, samples during training and the
LoRA in ComfyUI's key names loading in diffusers."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ti2v_support import FRAMES
from train_support import load, lora_tensors, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.cli import main as cli_main
from wantrainer.dataset.cache_format import cache_model_type, cache_vae_type, load_latent_cache
from wantrainer.errors import UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _latent_files(folder):
    return sorted(folder.glob("*_wan.safetensors"))


# ------------------------------------------------------------------------------------------------ caching


def test_ti2v_caches_hold_wan22_latents_and_record_the_vae(ti2v_workspace):
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.sources import scan_dataset
    from wantrainer.dataset.windows import window_pixels
    from wantrainer.models.wan.vae import WanVAE

    assert ti2v_workspace.summary.cached == 8 and not ti2v_workspace.summary.failed
    videos = _latent_files(ti2v_workspace.cache_dir())
    assert len(videos) == 4
    for path in videos + _latent_files(ti2v_workspace.cache_dir("image")):
        latents, meta = load_latent_cache(path)
        frames = 1 if "image" in path.name else (FRAMES - 1) // 4 + 1
        assert latents.shape == (48, frames, 4, 4)  # 48 channels, 64 px / 16
        assert meta["vae_type"] == "wan2.2" and meta["model_type"] == "ti2v" and meta["architecture"] == "wan"
        assert cache_vae_type(path) == "wan2.2" and cache_model_type(path) == "ti2v"
    # the values: the Wan 2.2 VAE's encoding of the window; its first latent frame is the first frame alone
    cfg = load(write_config(ti2v_workspace.root / "probe.toml", ti2v_workspace.config(ti2v_workspace.root)))
    spec = resolve_datasets(cfg.datasets, "train", "ti2v")[0]
    item = next(i for i in scan_dataset(spec).items if i.latent_cache_path == videos[0])
    _, pixels = next(iter(window_pixels([item])))
    vae = WanVAE.load(ti2v_workspace.kit.vae22)
    cached, _ = load_latent_cache(videos[0])
    assert (cached - vae.encode(pixels[None])[0]).abs().max().item() < 1e-4
    alone = vae.encode(pixels[None, :, :1])[0]  # [48, 1, 4, 4]: the conditioning image as the reference encodes it
    assert (cached[:, :1] - alone).abs().max().item() < 1e-4


def test_ti2v_buckets_step_by_32_and_resolutions_must_fit(ti2v_workspace, tmp_path):
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.buckets import BucketSelector
    from wantrainer.dataset.sources import scan_dataset

    values = ti2v_workspace.config(tmp_path, images=True)
    for entry in values["datasets"]["train"]:
        entry["resolution"] = [96, 64]
    cfg = load(write_config(tmp_path / "c.toml", values))
    specs = resolve_datasets(cfg.datasets, "train", "ti2v")
    assert [s.latent_stride for s in specs] == [16, 16]
    assert resolve_datasets(cfg.datasets, "train")[0].latent_stride == 8
    selector = BucketSelector((96, 64), True, step=32)
    assert selector.buckets and all(w % 32 == 0 and h % 32 == 0 for w, h in selector.buckets)
    assert any(w % 32 for w, _ in BucketSelector((96, 64), True).buckets)  # the Wan 2.1 buckets step by 16
    for spec in specs:
        for item in scan_dataset(spec).items:
            assert item.bucket[0] % 32 == 0 and item.bucket[1] % 32 == 0
            assert item.latent_shape[1:] == (item.bucket[1] // 16, item.bucket[0] // 16)
    values["datasets"]["train"][0]["resolution"] = [80, 48]  # fine for Wan 2.1, not for the 5B
    cfg = load(write_config(tmp_path / "odd.toml", values))
    with pytest.raises(UserError, match=r"`datasets.train\[0\].resolution` = 80x48: .*multiple of 32.*64x32"):
        resolve_datasets(cfg.datasets, "train", "ti2v")
    values["datasets"]["train"][0]["resolution"] = "720p"
    cfg = load(write_config(tmp_path / "720.toml", values))
    assert resolve_datasets(cfg.datasets, "train", "ti2v")[0].resolution == (1280, 704)  # Wan 2.2's 720P
    assert resolve_datasets(cfg.datasets, "train")[0].resolution == (1280, 720)


def test_source_fps_resamples_to_the_5b_rate(ti2v_workspace, tmp_path):
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.frames import resampled_indices
    from wantrainer.dataset.media import probe_video
    from wantrainer.dataset.sources import scan_dataset

    values = ti2v_workspace.config(tmp_path)
    values["datasets"]["train"][0]["source_fps"] = 32.0
    cfg = load(write_config(tmp_path / "c.toml", values))
    five_b, wan21 = (resolve_datasets(cfg.datasets, "train", m)[0] for m in ("ti2v", "t2v"))
    assert (five_b.model_fps, wan21.model_fps) == (24.0, 16.0)
    assert resampled_indices(10, 48.0, 24.0) == [0, 2, 4, 6, 8] and resampled_indices(10, 48.0) == [0, 3, 6, 9]
    for spec, fps in ((five_b, 24.0), (wan21, 16.0)):
        scan = scan_dataset(spec)
        for path, count in scan.frame_counts.items():
            assert count == len(resampled_indices(probe_video(path).frame_count, 32.0, fps))
        assert all(item.model_fps == fps for item in scan.items)
    assert len(scan_dataset(five_b).items) > len(scan_dataset(wan21).items)  # 9-frame windows fit more clips at 24


def test_cache_vae_type_of_caches_without_metadata(tmp_path):
    """musubi-tuner's caches carry no vae_type: the channel count tells (its caches are all Wan 2.1 VAE ones)."""
    meta = {"architecture": "wan", "width": "64", "height": "64", "format_version": "1.0.1"}
    for channels, vae_type, model_type in ((16, "wan2.1", "t2v"), (48, "wan2.2", "ti2v")):
        path = tmp_path / f"c{channels}_0064x0064_wan.safetensors"
        save_file({"latents_1x4x4_bfloat16": torch.zeros(channels, 1, 4, 4, dtype=torch.bfloat16)}, str(path),
                  metadata=meta)
        assert cache_vae_type(path) == vae_type and cache_model_type(path) == model_type


def test_a_wan21_vae_cache_for_the_5b_is_a_clear_error_naming_the_command(train_workspace, tmp_path, tiny_kit,
                                                                             capsys):  # fmt: skip
    from wantrainer.core.wan_network_trainer import build_trainer

    config = train_workspace.write(tmp_path, dit=str(tiny_kit.dit_wan22_ti2v))  # Wan 2.1 VAE caches at 64 x 64
    with pytest.raises(UserError, match=r"made by the Wan 2\.1 VAE.*the ti2v model trains on the latents of the "
                                        r"Wan 2\.2 VAE.*set `vae` to that file and re-run `wantrainer cache-latents"):
        build_trainer(load(config))
    assert cli_main(["train", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "wantrainer cache-latents" in captured.out + captured.err and "Traceback" not in captured.err


def test_a_wan22_vae_cache_for_a_16_channel_model_is_a_clear_error(ti2v_workspace, tmp_path, tiny_kit):
    from wantrainer.core.wan_network_trainer import build_trainer

    values = ti2v_workspace.config(tmp_path / "out", dit=str(tiny_kit.dit_wan21), target_model="wan21",
                                   vae=str(tiny_kit.vae))  # fmt: skip
    with pytest.raises(UserError, match=r"made by the Wan 2\.2 VAE.*the t2v model trains on the latents of the "
                                        r"Wan 2\.1 VAE.*wantrainer cache-latents"):
        build_trainer(load(write_config(tmp_path / "c.toml", values)))


def test_cache_latents_takes_the_vae_of_the_model_type(ti2v_workspace, tmp_path, tiny_kit):
    fresh = {"datasets": {"train": [{**ti2v_workspace.config(tmp_path)["datasets"]["train"][0],
                                     "cache_directory": str(tmp_path / "cache")}]}}  # fmt: skip
    wrong = ti2v_workspace.config(tmp_path, vae=str(tiny_kit.vae), **fresh)
    with pytest.raises(UserError, match=r"`vae` = .* 16 latent channels, but the ti2v DiT .*Wan 2\.2 VAE"):
        cache_latents(load(write_config(tmp_path / "wrong.toml", wrong)))
    reverse = ti2v_workspace.config(tmp_path, dit=str(tiny_kit.dit_wan21), target_model="wan21", **fresh)
    with pytest.raises(UserError, match=r"`vae` = .* 48 latent channels, but the t2v DiT .*Wan 2\.1 VAE"):
        cache_latents(load(write_config(tmp_path / "reverse.toml", reverse)))


def test_recaching_a_wan21_folder_for_the_5b_re_encodes_it(train_workspace, tmp_path, tiny_kit):
    cache = shutil.copytree(train_workspace.train_cache, tmp_path / "cache")
    values = {"dit": str(tiny_kit.dit_wan22_ti2v), "vae": str(tiny_kit.vae22), "datasets": {"train": [
        {"image_directory": str(train_workspace.train_media), "cache_directory": str(cache), "resolution": [64, 64]}]}}
    summary = cache_latents(load(write_config(tmp_path / "c.toml", values)))
    assert summary.stale == summary.cached == 4 and summary.skipped == 0
    assert all(cache_vae_type(p) == "wan2.2" for p in _latent_files(cache))
    assert cache_latents(load(tmp_path / "c.toml")).skipped == 4  # now current


# ------------------------------------------------------------------------------------------------ objective


def _reference_inputs(latents, noise, t):
    """Wan 2.2's textimage2video.py (i2v): masks_like(zero=True) -> mask2 0 on the first latent frame; the model
    input (1 - mask2) * z + mask2 * x_t and the per-token timestep mask2[0][0][:, ::2, ::2] * t, flattened."""
    mask2 = torch.ones_like(latents[0])
    mask2[:, 0] = 0
    noisy = (1 - t / 1000) * latents[0] + (t / 1000) * noise[0]
    return (1 - mask2) * latents[0] + mask2 * noisy, (mask2[0][:, ::2, ::2] * t).flatten()


def _trainer(ti2v_workspace, tmp_path, **overrides):
    from wantrainer.core.wan_network_trainer import build_trainer

    return build_trainer(load(ti2v_workspace.write(tmp_path, log_with="none", **overrides)))


def _pred_grad(trainer):
    """One training micro-batch through the real model: (context, d loss / d pred)."""
    batch = trainer._to_device(next(iter(trainer.loader)))
    ctx = trainer._noised_inputs(batch, "default")
    ctx.pred = trainer.call_model(trainer.model, ctx.noisy, ctx.timesteps, batch["text_embeds"])
    ctx.pred.retain_grad()
    loss, _ = trainer.compute_loss(ctx)
    loss.backward()
    return ctx, ctx.pred.grad


def test_image_to_video_items_get_the_reference_inputs_and_no_gradient_from_the_first_frame(ti2v_workspace, tmp_path):
    trainer = _trainer(ti2v_workspace, tmp_path, ti2v_image_ratio=1.0)
    ctx, grad = _pred_grad(trainer)
    latents, b = ctx.latents, ctx.latents.shape[0]
    tokens = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    assert ctx.timesteps.shape == (b, latents.shape[2] * tokens)
    for i in range(b):
        want_input, want_t = _reference_inputs(latents[i:i + 1], ctx.noise[i:i + 1], ctx.t[i] * 1000)
        assert torch.allclose(ctx.noisy[i], want_input, atol=1e-6)
        assert torch.allclose(ctx.timesteps[i], want_t)
    assert torch.equal(ctx.noisy[:, :, 0], latents[:, :, 0])  # the given frame is clean
    assert (ctx.timesteps[:, :tokens] == 0).all() and (ctx.timesteps[:, tokens:] > 0).all()
    assert grad[:, :, 0].abs().max().item() == 0.0  # exactly: the first frame is out of the loss
    assert grad[:, :, 1:].abs().min(dim=1).values.gt(0).float().mean().item() > 0.9
    assert sum(float(p.grad.abs().sum()) for p in trainer.groups[0].params if p.grad is not None) > 0
    # the loss does not depend on the target's first frame
    target = ctx.target.clone()
    target[:, :, 0] += 5.0
    first, _ = trainer.loss_fn(ctx.pred.detach(), ctx.target, ctx.batch, ctx)
    moved, _ = trainer.loss_fn(ctx.pred.detach(), target, ctx.batch, ctx)
    assert first.item() == moved.item()


def test_text_to_video_items_train_every_frame(ti2v_workspace, tmp_path):
    trainer = _trainer(ti2v_workspace, tmp_path, ti2v_image_ratio=0.0)
    ctx, grad = _pred_grad(trainer)
    assert ctx.timesteps.ndim == 1 and ctx.loss_mask is None
    assert torch.allclose(ctx.noisy, (1 - ctx.t.view(-1, 1, 1, 1, 1)) * ctx.latents
                          + ctx.t.view(-1, 1, 1, 1, 1) * ctx.noise)  # fmt: skip
    assert grad[:, :, 0].abs().min().item() > 0


def test_image_ratio_draws_per_item_reproducibly():
    from wantrainer.criteria.objectives import TI2VObjective

    objective = TI2VObjective(image_ratio=0.3, seed=11)
    batch = {"keys": ["k"] * 8, "batch_index": 0, "share_offset": 0}
    share = []
    for position in range(200):
        rows = objective.image_rows({**batch, "batch_index": position}, epoch=2, frames=3)
        share.append(rows.float().mean().item())
        assert torch.equal(rows, objective.image_rows({**batch, "batch_index": position}, epoch=2, frames=3))
        # a process's share of the global batch (DDP) makes the same choices as the whole batch
        half = objective.image_rows({"keys": ["k"] * 4, "batch_index": position, "share_offset": 4}, 2, 3)
        assert torch.equal(half, rows[4:])
    assert sum(share) / len(share) == pytest.approx(0.3, abs=0.03)
    assert not objective.image_rows(batch, epoch=0, frames=1).any()  # images: always text-to-video
    assert not TI2VObjective(0.0, 11).image_rows(batch, 0, 3).any()
    assert TI2VObjective(1.0, 11).image_rows(batch, 0, 3).all()


def test_ti2v_image_ratio_is_refused_for_other_models(train_workspace, tmp_path):
    from wantrainer.core.wan_network_trainer import build_trainer

    with pytest.raises(UserError, match=r"`ti2v_image_ratio` = 0.5: only the Wan 2.2 TI2V-5B.*t2v model"):
        build_trainer(load(train_workspace.write(tmp_path, ti2v_image_ratio=0.5)))


def test_ti2v_with_experts_keys_is_refused(ti2v_workspace, tmp_path, tiny_kit):
    from wantrainer.core.wan_network_trainer import build_trainer

    with pytest.raises(UserError, match=r"`dit_high_noise`: the TI2V-5B .* single model"):
        build_trainer(load(ti2v_workspace.write(tmp_path, dit_high_noise=str(tiny_kit.dit_wan22_ti2v))))


# ------------------------------------------------------------------------------------------------ training


LEARN_STEPS = 30
LEARN_FACTOR = 0.95
"""The held-out loss after LEARN_STEPS steps is below this fraction of the loss before, as for the other image-to-
video models (measured: 0.918 with every video item image-to-video, 0.916 with half of them)."""


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_learning_proof_heldout_loss_falls(ti2v_workspace, tmp_path, ratio):
    from wantrainer.core.handlers.validation import ValidationHandler

    trainer = _trainer(ti2v_workspace, tmp_path, val=True, images=True, max_train_steps=LEARN_STEPS,
                       learning_rate=1e-2, network_dim=8, network_alpha=8.0, validate_on_epoch_end=True,
                       ti2v_image_ratio=ratio)  # fmt: skip
    probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
    before = probe.evaluate(trainer)
    assert trainer.train() == "completed"
    after = probe.evaluate(trainer)
    assert after["val/loss"] < LEARN_FACTOR * before["val/loss"], (before, after)


def test_validation_leaves_the_given_frame_out(ti2v_workspace, tmp_path):
    """With every validation item image-to-video, a change of the cached first frame moves the loss only through
    the model's input (it is never a target): the loss differs from the text-to-video one."""
    from wantrainer.core.handlers.validation import ValidationHandler

    losses = {}
    for ratio in (0.0, 1.0):
        trainer = _trainer(ti2v_workspace, tmp_path / str(ratio), val=True, validate_on_epoch_end=True,
                           ti2v_image_ratio=ratio)  # fmt: skip
        probe = next(h for h in trainer.handlers if isinstance(h, ValidationHandler))
        assert probe.objective.image_ratio == ratio
        losses[ratio] = probe.evaluate(trainer)["val/loss"]
    assert abs(losses[1.0] - losses[0.0]) > 1e-4


def test_ti2v_resume_is_bit_identical(ti2v_workspace, tmp_path):
    from test_resume import assert_same_lora
    from wantrainer.core.wan_network_trainer import build_trainer

    common = dict(max_train_steps=6, lr_scheduler="linear", lr_warmup_steps=2, save_every_n_steps=3,
                  save_state=True, log_with="none", images=True)
    build_trainer(load(ti2v_workspace.write(tmp_path / "a", **common))).train()
    state = tmp_path / "a" / "out" / "lora-step00000003-state"
    resumed = build_trainer(load(ti2v_workspace.write(tmp_path / "b", resume=str(state), **common)))
    assert resumed.train() == "completed" and resumed.state.step == 6
    assert_same_lora(tmp_path / "a" / "out" / "lora.safetensors", tmp_path / "b" / "out" / "lora.safetensors")


@pytest.mark.slow
def test_ti2v_two_process_run_matches_one_process(ti2v_workspace, tmp_path):
    """The image-to-video choices are drawn per place in the global batch: 2 processes x 1 item train as 1 x 2."""
    from test_ddp_train import assert_runs_match, torchrun_train
    from wantrainer.core.wan_network_trainer import build_trainer

    def videos(batch):
        return {"train": [{**ti2v_workspace.config(tmp_path)["datasets"]["train"][0], "batch_size": batch}]}

    common = dict(max_train_steps=4, ti2v_image_ratio=0.5)
    single = ti2v_workspace.write(tmp_path / "single", datasets=videos(2), **common)
    assert build_trainer(load(single)).train() == "completed"
    torchrun_train(ti2v_workspace.write(tmp_path / "ddp", datasets=videos(1), **common))
    assert_runs_match(tmp_path / "single" / "out", tmp_path / "ddp" / "out", steps=4)


def test_samples_during_training_text_and_image_prompts(ti2v_workspace, tmp_path):
    import av
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(4).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    prompt = {"text": "a red ball moving left", "width": 64, "height": 64, "frames": 5, "steps": 2, "cfg_scale": 1.0}
    trainer = _trainer(ti2v_workspace, tmp_path, max_train_steps=2, sample_every_n_steps=2,
                       sample_prompts=[prompt, {**prompt, "image": str(tmp_path / "a.png")}])  # fmt: skip
    assert trainer.train() == "completed"
    files = sorted((tmp_path / "out" / "sample").glob("*.mp4"))
    assert [f.name for f in files] == ["lora_step00000002_p00_s42.mp4", "lora_step00000002_p01_s42.mp4"]
    for path in files:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            rate = container.streams.video[0].average_rate
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
        assert rate == 24  # the TI2V-5B's frame rate


def test_the_5b_lora_has_comfyui_names_and_loads_in_diffusers(ti2v_workspace, tmp_path):
    pytest.importorskip("peft")
    from diffusers import WanPipeline

    from diffusers_support import diffusers_twin, padded_context
    from wantrainer.models.wan.loading import load_wan_dit
    from wantrainer.networks.lora_wan import create_network

    trainer = _trainer(ti2v_workspace, tmp_path, max_train_steps=2, learning_rate=5e-2)
    assert trainer.train() == "completed"
    path = tmp_path / "out" / "lora.safetensors"
    sd = lora_tensors(path)
    dit = load_wan_dit(ti2v_workspace.kit.dit_wan22_ti2v, dtype=torch.float32).eval()
    # ComfyUI derives a LoRA key from the model weight: "lora_unet_" + its module path with "." -> "_"; the 5B's
    # names are those of every other Wan DiT (a 16-channel DiT of the same shape gives the same set)
    network = create_network(trainer.cfg.network, dit)
    assert set(sd) == set(network.state_dict()) and "lora_unet_blocks_0_self_attn_q.lora_down.weight" in sd
    t2v = create_network(trainer.cfg.network, load_wan_dit(ti2v_workspace.kit.dit_wan21, dtype=torch.float32))
    assert set(t2v.state_dict()) == set(sd)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_model_type"] == "ti2v"
    assert meta["modelspec.architecture"] == "wan2.2/lora"
    ref = diffusers_twin(dit)
    network.load_state_dict(sd)
    network.apply_to(dit)
    gen = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 48, 2, 4, 4, generator=gen), [torch.randn(6, 64, generator=gen)]
    t = torch.tensor([[0.0] * 4 + [700.0] * 4])  # the per-token path of an image-to-video item
    with torch.no_grad():
        ours = dit(x, t, ctx)
        base = ref(x, t, padded_context(ctx), return_dict=False)[0]
        WanPipeline.load_lora_into_transformer(WanPipeline.lora_state_dict(str(path)), transformer=ref)
        got = ref(x, t, padded_context(ctx), return_dict=False)[0]
    assert (ours - base).abs().max().item() > 1e-3  # the trained LoRA changes the output
    assert (got - ours).abs().max().item() < 1e-4


def test_estimate_counts_the_5b_tokens_on_the_16x_grid(ti2v_workspace, tmp_path):
    from wantrainer.estimate.cli import largest_batch_tokens

    tokens, batch, _ = largest_batch_tokens(load(ti2v_workspace.write(tmp_path)), None, None)
    assert (tokens, batch) == (3 * 3 * 2 * 2, 3)  # batch 3 x 3 latent frames x (64 / 32) x (64 / 32)


def test_doctor_warns_about_clips_that_are_not_the_5b_rate(ti2v_workspace, tmp_path, capsys):
    """The kit's clips are 16 fps: right for Wan 2.1, 1.5x fast motion for the 24 fps TI2V-5B."""
    config = ti2v_workspace.write(tmp_path)
    assert cli_main(["doctor", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "WARNING: 4 video(s) are not 24 fps (16 fps" in text and "resample them to 24 fps" in text
    assert "fast motion (1.5x faster than real time at the model's 24 fps)" in text


def test_cache_text_reads_the_clips_at_the_5b_rate(ti2v_workspace, tmp_path, tiny_kit):
    """With source_fps, a clip too short for the window at 16 fps is long enough at the 5B's 24 fps: its caption is
    cached for the 5B (and not for a Wan 2.1 run, which has no item for it)."""
    from wantrainer.caching.cache_text_encoder_outputs import cache_text

    entry = {**ti2v_workspace.config(tmp_path)["datasets"]["train"][0], "source_fps": 32.0,
             "cache_directory": str(tmp_path / "cache")}  # fmt: skip
    five_b = cache_text(load(write_config(tmp_path / "5b.toml", ti2v_workspace.config(
        tmp_path, datasets={"train": [entry]}))))  # fmt: skip
    shutil.rmtree(tmp_path / "cache")
    wan21 = cache_text(load(write_config(tmp_path / "21.toml", ti2v_workspace.config(
        tmp_path, dit=str(tiny_kit.dit_wan21), target_model="wan21", vae=str(tiny_kit.vae),
        datasets={"train": [entry]}))))  # fmt: skip
    assert five_b.cached > wan21.cached


def test_loss_masks_are_cached_on_the_5b_latent_grid(tiny_kit, tmp_path):
    """Per-item loss masks follow the Wan 2.2 VAE's 16 x 16 cells: a left-half mask covers 2 of 4 latent columns."""
    import numpy as np
    from PIL import Image

    from wantrainer.config_parser import parse_config
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.sources import scan_dataset
    from wantrainer.devkit.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path, seed=2, num_images=2, num_videos=0)
    (tmp_path / "masks").mkdir()
    for path in sorted(data.image_dir.glob("*.png")):
        width, height = Image.open(path).size
        mask = np.zeros((height, width), np.uint8)
        mask[:, : width // 2] = 255
        Image.fromarray(mask, mode="L").save(tmp_path / "masks" / path.name)
    cfg = parse_config({"dit": str(tiny_kit.dit_wan22_ti2v), "vae": str(tiny_kit.vae22),
                        "use_masked_training_with_prior": True, "datasets": {"general": {"resolution": 64}, "train": [
                            {"image_directory": "images", "cache_directory": "c", "mask_directory": "masks"}]}},
                       config_dir=tmp_path)  # fmt: skip
    summary = cache_latents(cfg)
    assert summary.failed == [] and summary.masks_cached == 2
    for item in scan_dataset(resolve_datasets(cfg.datasets, "train", "ti2v")[0]).items:
        with safe_open(str(item.mask_cache_path), framework="pt") as f:
            (key,) = list(f.keys())
            mask = f.get_tensor(key).float()
        assert key.startswith("mask_1x4x4_") and mask.shape == (1, 4, 4)
        if Image.open(item.path).size[0] == 64:  # uncropped: the white half is exactly the 2 left cell columns
            expected = torch.zeros(1, 4, 4)
            expected[..., :2] = 1.0
            torch.testing.assert_close(mask, expected, rtol=0, atol=1e-3)


def test_estimate_takes_the_5b_preset_on_its_grid(ti2v_workspace, tmp_path, capsys):
    config = ti2v_workspace.write(tmp_path, dit=str(tmp_path / "not_downloaded.safetensors"))
    code = cli_main(["estimate", "--config", str(config), "--model", "wan22_ti2v_5b", "--resolution", "832x480",
                     "--frames", "81", "--vram", "24"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "wan22_ti2v_5b, 30 blocks" in text
    assert f"{21 * (480 // 32) * (832 // 32)} tokens" in text  # 21 latent frames x 15 x 26 (16x VAE, patch 2)
