"""Loss masks on the dataset side: lookup, the latent-grid mapping, the mask cache written by cache-latents, the
mask_missing rule, reporting (doctor, caching, training discovery) and the doctor's mask sheet."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from wantrainer.caching.cache_latents import cache_latents
from wantrainer.cli import main
from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.cache_format import (
    LATENT_NAME,
    MASK_NAME,
    TEXT_SUFFIX,
    mask_cache_name,
    save_text_cache,
)
from wantrainer.dataset.cached_items import discover_cached_items
from wantrainer.dataset.masks import to_latent_grid
from wantrainer.dataset.sources import scan_dataset
from wantrainer.devkit.synthetic import make_synthetic_dataset, write_mp4
from wantrainer.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _gray(path: Path, array: np.ndarray) -> None:
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)


def _left_half(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return mask


def _video_size(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height


def _read_mask(path: Path) -> tuple[str, torch.Tensor, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        (key,) = list(f.keys())
        return key, f.get_tensor(key).float(), f.metadata()


def _config(kit, root: Path, train: list[dict], **cache):
    masked = any("mask_directory" in entry for entry in train)
    return parse_config({"vae": str(kit.vae), "use_masked_training_with_prior": masked, "datasets": {
        "general": {"resolution": 64}, "train": train,
        "latent_cache": {"num_workers": 1, **cache}}}, config_dir=root)


def test_latent_grid_first_frame_alone_then_groups_of_four():
    # 9 frames of 16 x 16: frame i is uniformly i / 8; a white 8 x 8 square in the top-left of frame 0 only
    pixels = torch.arange(9, dtype=torch.float32).div(8).view(9, 1, 1).expand(9, 16, 16).clone()
    pixels[0] = 0.0
    pixels[0, :8, :8] = 1.0
    grid = to_latent_grid(pixels)
    assert grid.shape == (3, 2, 2)
    assert grid[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]  # latent frame 0 = pixel frame 0 alone
    torch.testing.assert_close(grid[1], torch.full((2, 2), (1 + 2 + 3 + 4) / 32))  # frames 1..4
    torch.testing.assert_close(grid[2], torch.full((2, 2), (5 + 6 + 7 + 8) / 32))  # frames 5..8
    half = torch.zeros(1, 16, 16)
    half[0, :, :4] = 1.0  # half of the left cells' pixels
    assert to_latent_grid(half)[0].tolist() == [[0.5, 0.0], [0.5, 0.0]]
    with pytest.raises(ValueError, match="VAE grid"):
        to_latent_grid(torch.ones(4, 16, 16))


def test_mask_cache_names_cannot_collide():
    name = mask_cache_name("clip_000", 64, 64, start=4, frames=9)
    assert name == "clip_000_00004-009_0064x0064_wan_wtmask.safetensors"
    assert MASK_NAME.match(name) and not LATENT_NAME.match(name) and not name.endswith(TEXT_SUFFIX)
    # musubi-tuner's globs for its Wan caches
    assert not Path(name).match("*_wan.safetensors") and not Path(name).match("*_wan_te.safetensors")
    assert not MASK_NAME.match("clip_000_00004-009_0064x0064_wan.safetensors")


def test_image_and_video_masks_cached_at_latent_resolution(tiny_kit, tmp_path):
    ds = make_synthetic_dataset(tmp_path, seed=0, num_images=3, num_videos=2, video_frames=(17, 17))
    image_masks, video_masks = tmp_path / "image_masks", tmp_path / "video_masks"
    image_masks.mkdir()
    video_masks.mkdir()
    sizes = {}
    for path in sorted(ds.image_dir.glob("*.png")):
        sizes[path.stem] = Image.open(path).size
        _gray(image_masks / path.name, _left_half(sizes[path.stem]))
    clip0, clip1 = sorted(ds.video_dir.glob("*.mp4"))
    width0, height0 = _video_size(clip0)
    width1, height1 = _video_size(clip1)
    # clip 0: a frame folder, frame i uniformly 15 * i (lossless); clip 1: one image for every frame
    (video_masks / clip0.stem).mkdir()
    for i in range(17):
        _gray(video_masks / clip0.stem / f"{i:03d}.png", np.full((height0, width0), 15 * i))
    _gray(video_masks / f"{clip1.stem}.png", _left_half((width1, height1)))
    cfg = _config(tiny_kit, tmp_path, [
        {"image_directory": "images", "cache_directory": "ci", "mask_directory": "image_masks"},
        {"video_directory": "videos", "cache_directory": "cv", "mask_directory": "video_masks", "target_frames": [9],
         "frame_extraction": "slide", "frame_stride": 4}])
    summary = cache_latents(cfg)
    assert summary.failed == [] and summary.unmasked == [] and summary.masks_cached == 3 + 6
    assert "mask caches: 9 cached, 0 skipped (existing)" in summary.lines()
    specs = resolve_datasets(cfg.datasets, "train")
    for item in scan_dataset(specs[0]).items:
        key, mask, meta = _read_mask(item.mask_cache_path)
        assert item.mask_cache_path.name == item.latent_cache_path.name.replace("_wan.", "_wan_wtmask.")
        assert key == "mask_1x8x8_float16" and meta["mask_source"] == f"{item.key}.png"
        # a 64-pixel-wide source keeps its left half white (cells 0..3); a 96-wide one is centre-cropped to
        # 64: its white columns 0..47 become 0..31 of the crop, the same 4 cells
        if sizes[item.key][0] in (64, 96):
            expected = torch.zeros(1, 8, 8)
            expected[..., :4] = 1.0
            torch.testing.assert_close(mask, expected, rtol=0, atol=1e-3)
    windows = {item.start: item for item in scan_dataset(specs[1]).items if item.source_stem == clip0.stem}
    assert sorted(windows) == [0, 4, 8]
    for start, item in windows.items():
        _, mask, _ = _read_mask(item.mask_cache_path)
        levels = torch.tensor([15.0 * i for i in range(start, start + 9)]) / 255
        expected = torch.stack([levels[0], levels[1:5].mean(), levels[5:9].mean()])  # frame 0 alone, then 4 by 4
        torch.testing.assert_close(mask.mean(dim=(1, 2)), expected, rtol=0, atol=2e-3)
        assert float((mask - mask.mean(dim=(1, 2), keepdim=True)).abs().max()) < 2e-3  # uniform frames
    # skip_existing keeps current mask caches; an edited mask is made again
    again = cache_latents(cfg)
    assert (again.cached, again.masks_cached, again.masks_skipped) == (0, 0, 9)
    _gray(image_masks / "image_000.png", np.full(sizes["image_000"][::-1], 255))
    edited = cache_latents(cfg)
    assert (edited.masks_cached, edited.masks_skipped) == (1, 8)
    # a dataset whose mask_directory is removed: its mask caches are orphans, deleted
    cfg = _config(tiny_kit, tmp_path, [{"image_directory": "images", "cache_directory": "ci"}])
    removed = cache_latents(cfg)
    assert len(removed.removed) == 3 and not list((tmp_path / "ci").glob("*_wan_wtmask.safetensors"))


def test_mask_video_mp4(tiny_kit, tmp_path):
    ds = make_synthetic_dataset(tmp_path, seed=1, num_images=0, num_videos=1, video_frames=(9, 9))
    clip = next(ds.video_dir.glob("*.mp4"))
    width, height = _video_size(clip)
    (tmp_path / "masks").mkdir()
    frames = [np.full((height, width, 3), 255 if i < 5 else 0, np.uint8) for i in range(9)]
    write_mp4(tmp_path / "masks" / clip.name, frames)
    cfg = _config(tiny_kit, tmp_path, [{"video_directory": "videos", "cache_directory": "cv", "mask_directory": "masks",
                                        "target_frames": [9]}])
    assert cache_latents(cfg).failed == []
    (item,) = scan_dataset(resolve_datasets(cfg.datasets, "train")[0]).items
    _, mask, _ = _read_mask(item.mask_cache_path)
    torch.testing.assert_close(mask.mean(dim=(1, 2)), torch.tensor([1.0, 1.0, 0.0]), rtol=0, atol=0.03)


def _problem_set(root: Path) -> Path:
    """Five images whose masks are: fine, missing, of another size, not an image file, truncated."""
    ds = make_synthetic_dataset(root, seed=2, num_images=5, num_videos=0)
    masks = root / "masks"
    masks.mkdir()
    paths = sorted(ds.image_dir.glob("*.png"))
    _gray(masks / paths[0].name, _left_half(Image.open(paths[0]).size))
    width, height = Image.open(paths[2]).size
    _gray(masks / paths[2].name, np.zeros((height * 2, width * 2)))
    (masks / paths[3].name).write_bytes(b"not an image at all")
    _gray(masks / paths[4].name, _left_half(Image.open(paths[4]).size))
    data = (masks / paths[4].name).read_bytes()
    (masks / paths[4].name).write_bytes(data[: len(data) // 2])  # the header passes, decoding fails
    return masks


@pytest.mark.parametrize("rule", ["skip", "unmasked"])
def test_bad_masks_follow_the_rule_and_are_reported(tiny_kit, tmp_path, capsys, rule):
    _problem_set(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'vae = "{Path(tiny_kit.vae).as_posix()}"\noutput_dir = "out"\nuse_masked_training_with_prior = true\n'
                      '[[datasets.train]]\nimage_directory = "images"\ncache_directory = "ci"\nresolution = 64\n'
                      f'mask_directory = "masks"\nmask_missing = "{rule}"\n', encoding="utf-8")
    assert main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no mask image_001.* in" in out
    assert "mask image_002.png is " in out and "a mask must have the media's pixel size" in out
    assert "unreadable mask image_003.png" in out and "unreadable mask image_004.png" in out  # doctor decodes
    if rule == "skip":
        assert out.count('mask_missing = "skip": not trained') == 4
        assert "1 of 1 item(s) masked, 0 file(s) trained unmasked, 4 skipped for their mask" in out
    else:
        assert 'masks missing or bad (mask_missing = "unmasked": trained on the whole frame)' in out
        assert "1 of 5 item(s) masked, 4 file(s) trained unmasked, 0 skipped" in out
    assert (tmp_path / "out" / "doctor_train_0_masks.png").is_file()

    assert main(["cache-latents", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unreadable mask image_004.png" in err  # found while caching (truncated)
    masks = sorted(p.name for p in (tmp_path / "ci").glob("*_wan_wtmask.safetensors"))
    latents = sorted(p.name for p in (tmp_path / "ci").glob("*_wan.safetensors"))
    if rule == "skip":
        assert [m.split("_0")[0] for m in masks] == ["image"] and masks[0].startswith("image_000")
        assert len(latents) == 1  # the skipped items are not encoded
    else:
        summary = [line for line in err.splitlines() if "unmasked: " in line and "trained on the whole frame" in line]
        assert len(summary) == 4 and all("WARNING" in line for line in summary)  # the summary lists each one
        assert len(masks) == len(latents) == 5
        for name in masks[1:]:
            _, mask, meta = _read_mask(tmp_path / "ci" / name)
            assert bool((mask == 1).all()) and meta["mask_unmasked"]
        assert "unreadable mask image_004.png" in _read_mask(tmp_path / "ci" / masks[4])[2]["mask_unmasked"]
        assert "no mask image_001.*" in _read_mask(tmp_path / "ci" / masks[1])[2]["mask_unmasked"]


def test_training_discovery_needs_current_mask_caches(tiny_kit, tmp_path):
    ds = make_synthetic_dataset(tmp_path, seed=0, num_images=2, num_videos=0)
    (tmp_path / "masks").mkdir()
    for path in ds.image_dir.glob("*.png"):
        _gray(tmp_path / "masks" / path.name, _left_half(Image.open(path).size))
    cfg = _config(tiny_kit, tmp_path, [{"image_directory": "images", "cache_directory": "ci",
                                        "mask_directory": "masks"}])
    cache_latents(cfg)
    spec = resolve_datasets(cfg.datasets, "train")[0]
    for item in scan_dataset(spec).items:  # text caches: any one tensor will do here
        save_text_cache(item.text_cache_path, torch.zeros(3, 8))
    items, report = discover_cached_items(spec)
    assert report.usable == 2 and all(i.mask_path is not None and i.mask_path.is_file() for i in items)
    # an edited mask makes its cache stale; a deleted cache is missing: both items stay out, reported
    _gray(tmp_path / "masks" / "image_000.png", np.full(Image.open(ds.image_dir / "image_000.png").size[::-1], 9))
    next((tmp_path / "ci").glob("image_001_*_wan_wtmask.safetensors")).unlink()
    items, report = discover_cached_items(spec)
    assert report.usable == 0 and report.stale_masks == ["image_000"] and report.missing_masks == ["image_001"]
    assert "run `wantrainer cache-latents`, which caches the masks" in report.summary()


def test_mask_config_mistakes(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError) as err:
        parse_config({"datasets": {"train": [
            {"image_directory": "images", "cache_directory": "c0", "mask_missing": "unmasked"},
            {"image_directory": "images2", "mask_directory": "images2"}]}}, config_dir=tmp_path)
    text = str(err.value)
    assert "`datasets.train[0].mask_missing` only applies with `mask_directory`" in text
    assert "`datasets.train[1].mask_directory` is the media folder" in text
    with pytest.raises(ConfigError, match='`datasets.train\\[0\\].mask_missing` must be one of "skip", "unmasked"'):
        parse_config({"datasets": {"train": [{"image_directory": "images", "mask_directory": "m",
                                              "mask_missing": "ignore"}]}}, config_dir=tmp_path)
    # a mask folder that does not exist: named when the media is scanned, like a missing media folder
    cfg = parse_config({"use_masked_training_with_prior": True, "datasets": {"train": [
        {"image_directory": "images", "mask_directory": "nowhere"}]}}, config_dir=tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    with pytest.raises(UserError, match="`datasets.train\\[0\\].mask_directory`: folder .*nowhere does not exist"):
        scan_dataset(resolve_datasets(cfg.datasets, "train")[0])
