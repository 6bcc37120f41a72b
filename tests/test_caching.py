"""cache-latents / cache-text on synthetic media with the tiny kit: names, keys, values, skip, orphans, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.caching.common import compute_dtype, resolve_device
from wantrainer.cli import main
from wantrainer.config_parser import load_config, parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.loader import build_dataloader
from wantrainer.devkit.synthetic import make_synthetic_dataset
from wantrainer.errors import UserError
from wantrainer.models.wan.text_encoder import WanTextEncoder
from wantrainer.models.wan.vae import WanVAE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# musubi-tuner's names: an image's own size; a video's frame size after musubi's bucketing (96x64 -> 80x48 at 64)
IMAGE_LATENTS = ["image_000_0064x0096_wan.safetensors", "image_001_0096x0064_wan.safetensors",
                 "image_002_0096x0064_wan.safetensors"]
VIDEO_LATENTS = ["clip_000_00000-009_0064x0064_wan.safetensors", "clip_001_00000-009_0080x0048_wan.safetensors"]
IMAGE_TEXTS = [f"image_{i:03d}_wan_te.safetensors" for i in range(3)]
VIDEO_TEXTS = [f"clip_{i:03d}_wan_te.safetensors" for i in range(2)]


def _config(kit, root: Path, **cache_settings):
    data = {
        "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
        "datasets": {
            "general": {"resolution": 64},
            "train": [{"image_directory": "images", "cache_directory": "cache_images"}],
            "val": [{"video_directory": "videos", "cache_directory": "cache_videos", "target_frames": [9]}],
            "latent_cache": {"batch_size": 2, "num_workers": 2, **cache_settings},
            "text_encoder_cache": {"batch_size": 2, "num_workers": 1, **cache_settings},
        },
    }
    return parse_config(data, config_dir=root)


@pytest.fixture()
def media(synthetic_media, tmp_path):
    """A writable copy of 3 images and 2 clips of the session's synthetic set."""
    for sub, names in (("images", [f"image_{i:03d}" for i in range(3)]), ("videos", [f"clip_{i:03d}" for i in range(2)])):
        (tmp_path / sub).mkdir()
        for name in names:
            for file in (synthetic_media.root / sub).glob(name + ".*"):
                shutil.copy(file, tmp_path / sub / file.name)
    return tmp_path


def _state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_cache_names_keys_values_skip_and_orphans(tiny_kit, media):
    cfg = _config(tiny_kit, media)
    latent_summary, text_summary = cache_latents(cfg), cache_text(cfg)
    assert (latent_summary.cached, latent_summary.skipped, latent_summary.failed) == (5, 0, [])
    assert (text_summary.cached, text_summary.skipped, text_summary.failed) == (5, 0, [])
    assert sorted(p.name for p in (media / "cache_images").iterdir()) == sorted(IMAGE_LATENTS + IMAGE_TEXTS)
    assert sorted(p.name for p in (media / "cache_videos").iterdir()) == sorted(VIDEO_LATENTS + VIDEO_TEXTS)

    # latents: literal key, metadata as musubi-tuner writes it (the size in the name), values = the VAE called directly
    vae = WanVAE.load(tiny_kit.vae)
    specs = resolve_datasets(cfg.datasets, "train") + resolve_datasets(cfg.datasets, "val")
    from wantrainer.dataset.sources import scan_dataset

    items = {i.latent_cache_path.name: i for s in specs for i in scan_dataset(s).items}
    for name, key, frames in [(IMAGE_LATENTS[0], "latents_1x8x8_float32", None),
                              (VIDEO_LATENTS[1], "latents_3x8x8_float32", "9")]:
        path = media / ("cache_images" if frames is None else "cache_videos") / name
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) == [key]
            meta = f.metadata()
            tensor = f.get_tensor(key)
        item = items[name]
        width, height = Image.open(item.path).size if frames is None else (80, 48)
        assert meta == {"architecture": "wan", "width": str(width), "height": str(height), "format_version": "1.0.1",
                        "model_type": "t2v", "vae_type": "wan2.1", **({"frame_count": frames} if frames else {})}
        torch.testing.assert_close(tensor, vae.encode(item.load_pixels()[None])[0], rtol=0, atol=1e-5)

    # text: literal key, [L, 64] with L = the caption's token count, caption recorded, values = the encoder
    encoder = WanTextEncoder.load(tiny_kit.t5, tiny_kit.tokenizer_dir)
    path = media / "cache_videos" / VIDEO_TEXTS[0]
    caption = (media / "videos" / "clip_000.txt").read_text().strip()
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["varlen_t5_float32"]
        assert f.metadata() == {"architecture": "wan", "caption1": caption, "format_version": "1.0.1"}
        embeds = f.get_tensor("varlen_t5_float32")
    assert embeds.shape == (len(encoder.tokenizer(caption)["input_ids"]), 64)
    torch.testing.assert_close(embeds, encoder.encode([caption])[0], rtol=0, atol=1e-5)

    # the dataset loader reads every written file back
    batches = list(build_dataloader(resolve_datasets(cfg.datasets, "train"), seed=0, shuffle=False))
    assert sorted(k for b in batches for k in b["keys"]) == ["image_000", "image_001", "image_002"]
    assert all(b["latents"].shape[1:] == (16, 1, 8, 8) and b["text_embeds"][0].shape[1] == 64 for b in batches)

    # a second run with skip_existing touches nothing
    before = {d: _state(media / d) for d in ("cache_images", "cache_videos")}
    again_l, again_t = cache_latents(cfg), cache_text(cfg)
    assert (again_l.cached, again_l.skipped, again_t.cached, again_t.skipped) == (0, 5, 0, 5)
    assert not again_l.removed and not again_t.removed
    assert before == {d: _state(media / d) for d in ("cache_images", "cache_videos")}

    # a cache under the right name holding another shape (made at another resolution) is re-encoded, not skipped
    stale_path = media / "cache_images" / IMAGE_LATENTS[1]
    save_file({"latents_1x12x8_bfloat16": torch.zeros(16, 1, 12, 8, dtype=torch.bfloat16)}, str(stale_path),
              metadata={"architecture": "wan", "width": "96", "height": "64", "format_version": "1.0.1"})
    restaled = cache_latents(cfg)
    assert (restaled.cached, restaled.stale, restaled.skipped) == (1, 1, 4)
    assert "1 cached (1 re-encoded (stale)), 4 skipped" in restaled.lines()[0]
    with safe_open(str(stale_path), framework="pt") as f:
        assert list(f.keys()) == ["latents_1x8x8_float32"]

    # caches re-cached in another dtype over the file (musubi keeps the old tensor): encoded again with skip_existing
    for path, old, new in [(stale_path, "latents_1x8x8_float32", "latents_1x8x8_bfloat16"),
                           (media / "cache_images" / IMAGE_TEXTS[0], "varlen_t5_float32", "varlen_t5_bfloat16")]:
        tensors = load_file(str(path))
        save_file({**tensors, new: tensors[old].to(torch.bfloat16)}, str(path), metadata={"architecture": "wan"})
    twice_l, twice_t = cache_latents(cfg), cache_text(cfg)
    assert (twice_l.cached, twice_l.stale, twice_l.skipped, twice_t.cached, twice_t.skipped) == (1, 1, 4, 1, 4)
    assert list(load_file(str(stale_path))) == ["latents_1x8x8_float32"]
    assert list(load_file(str(media / "cache_images" / IMAGE_TEXTS[0]))) == ["varlen_t5_float32"]

    # an edited caption is encoded again, the rest is left alone
    (media / "images" / "image_002.txt").write_text("a purple star spinning\n")
    edited = cache_text(cfg)
    assert (edited.cached, edited.skipped) == (1, 4)
    assert safe_open(str(media / "cache_images" / IMAGE_TEXTS[2]), "pt").metadata()["caption1"] == "a purple star spinning"

    # removed media: its caches are orphans, kept with keep_cache, deleted otherwise; foreign files survive
    (media / "images" / "image_001.png").unlink()
    (media / "cache_images" / "notes.safetensors").write_bytes(b"x")
    older = "image_000_0128x0192_wan.safetensors"  # the same stem at another source size: the media was replaced
    shutil.copy(media / "cache_images" / IMAGE_LATENTS[0], media / "cache_images" / older)
    kept = cache_latents(_config(tiny_kit, media, keep_cache=True))
    assert [p.name for p in kept.orphans_kept] == [older, IMAGE_LATENTS[1]]
    assert (media / "cache_images" / IMAGE_LATENTS[1]).exists()
    removed_l, removed_t = cache_latents(cfg), cache_text(cfg)
    assert [p.name for p in removed_l.removed] == [older, IMAGE_LATENTS[1]]
    assert [p.name for p in removed_t.removed] == [IMAGE_TEXTS[1]]
    assert sorted(p.name for p in (media / "cache_images").iterdir()) == sorted(
        [IMAGE_LATENTS[0], IMAGE_LATENTS[2], IMAGE_TEXTS[0], IMAGE_TEXTS[2], "notes.safetensors"])
    assert len(list((media / "cache_videos").iterdir())) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_each_video_is_decoded_once_for_all_its_windows(tiny_kit, tmp_path, workers):
    from wantrainer.dataset.media import count_decode_passes
    from wantrainer.dataset.sources import scan_dataset

    make_synthetic_dataset(tmp_path, seed=4, num_images=0, num_videos=2, video_frames=(21, 29))
    cfg = parse_config({"vae": str(tiny_kit.vae), "datasets": {
        "train": [{"video_directory": "videos", "cache_directory": "cache", "resolution": 32, "target_frames": [5, 9],
                   "frame_extraction": "slide", "frame_stride": 4}],
        "latent_cache": {"batch_size": 3, "num_workers": workers}}}, config_dir=tmp_path)
    items = [item for spec in resolve_datasets(cfg.datasets, "train") for item in scan_dataset(spec).items]
    assert len(items) > 10
    with count_decode_passes() as passes:
        summary = cache_latents(cfg)
    assert (summary.cached, summary.failed) == (len(items), [])
    assert passes == {path: 1 for path in {item.path for item in items}}
    vae = WanVAE.load(tiny_kit.vae)
    for item in items:
        cached = next(iter(load_file(str(item.latent_cache_path)).values()))
        torch.testing.assert_close(cached, vae.encode(item.load_pixels()[None])[0], rtol=0, atol=1e-5)


def test_corrupt_media_is_listed_and_the_command_goes_on(tiny_kit, tmp_path, caplog):
    make_synthetic_dataset(tmp_path, seed=3, num_images=2, num_videos=1, with_corrupt_image=True,
                           with_truncated_video=True)
    config = tmp_path / "cache.toml"
    config.write_text(
        f'vae = "{tiny_kit.vae}"\nt5 = "{tiny_kit.t5}"\nt5_tokenizer = "{tiny_kit.tokenizer_dir}"\n'
        "[datasets.general]\nresolution = 64\ntarget_frames = [9]\n"
        '[[datasets.train]]\nimage_directory = "images"\ncache_directory = "ci"\n'
        '[[datasets.train]]\nvideo_directory = "videos"\ncache_directory = "cv"\n'
        "[datasets.latent_cache]\nnum_workers = 1\n", encoding="utf-8")
    assert main(["cache-latents", "--config", str(config)]) == 0
    assert main(["cache-text", "--config", str(config)]) == 0
    assert sorted(p.name for p in (tmp_path / "ci").iterdir()) == [
        "image_000_0096x0064_wan.safetensors", "image_000_wan_te.safetensors",
        "image_001_0064x0096_wan.safetensors", "image_001_wan_te.safetensors"]
    assert "clip_000_00000-009_0064x0064_wan.safetensors" in {p.name for p in (tmp_path / "cv").iterdir()}
    summary = cache_latents(load_config(config))
    assert {p.name for p, _ in summary.failed} == {"broken.png", "truncated.mp4"}
    assert summary.skipped == 3


def test_non_finite_latents_are_reported_not_written(tiny_kit, media, tmp_path):
    state = load_file(str(tiny_kit.vae))
    state["conv1.bias"] = torch.full_like(state["conv1.bias"], float("nan"))
    save_file(state, str(tmp_path / "nan_vae.safetensors"))
    cfg = _config(tiny_kit, media)
    cfg.model.vae = tmp_path / "nan_vae.safetensors"
    summary = cache_latents(cfg)
    assert summary.cached == 0 and len(summary.non_finite) == 5 and len(summary.failed) == 5
    assert not (media / "cache_images").exists() and not (media / "cache_videos").exists()
    assert "NaN" in summary.lines()[1]


def test_settings_errors(tiny_kit, media):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda", "datasets.latent_cache.device")
        assert resolve_device("auto", "datasets.latent_cache.device") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0", "datasets.latent_cache.device")
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert compute_dtype("float16", torch.device("cpu")) == torch.float16
    cfg = _config(tiny_kit, media)
    cfg.model.vae = None
    with pytest.raises(UserError, match="`vae` is not set"):
        cache_latents(cfg)
    cfg.model.t5_tokenizer = str(media / "no_tokenizer")
    with pytest.raises(UserError, match="t5_tokenizer"):
        cache_text(cfg)


@pytest.mark.parametrize(("command", "table"), [("cache-latents", "latent_cache"),
                                                ("cache-text", "text_encoder_cache")])
def test_cuda_device_without_cuda_is_a_user_error(tiny_kit, media, monkeypatch, capsys, command, table):
    """`device = "cuda"` on a machine without CUDA: exit 2 naming the key, no traceback, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = media / "config.toml"
    config.write_text(
        f'vae = "{kit_path(tiny_kit.vae)}"\nt5 = "{kit_path(tiny_kit.t5)}"\n'
        f't5_tokenizer = "{kit_path(tiny_kit.tokenizer_dir)}"\n\n'
        '[datasets.general]\nresolution = 64\n\n'
        '[[datasets.train]]\nimage_directory = "images"\ncache_directory = "cache_images"\n\n'
        f'[datasets.{table}]\ndevice = "cuda"\n'
    )
    assert main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"`datasets.{table}.device` = 'cuda' but no CUDA device is available" in err
    assert "Traceback" not in err
    assert not (media / "cache_images").exists()


def kit_path(path: Path) -> str:
    return Path(path).as_posix()
