"""Blueprint, bucket maths, frame windows and media scanning on synthetic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import parse_resolution, resolve_datasets
from wantrainer.dataset.buckets import BucketSelector, bucket_resolutions, resize_to_bucket
from wantrainer.dataset.frames import frame_windows, resampled_indices
from wantrainer.dataset.sources import scan_dataset
from wantrainer.devkit.synthetic import make_synthetic_dataset, write_mp4
from wantrainer.errors import ConfigError, UserError


def _specs(datasets: dict, base: Path, split: str = "train"):
    return resolve_datasets(parse_config({"datasets": datasets}, config_dir=base).datasets, split)


# --- blueprint -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(512, (512, 512)), ("960x544", (960, 544)), ([832, 480], (832, 480)), ("480p", (832, 480)),
     ("720p", (1280, 720)), (" 64 X 48 ", (64, 48))],
)
def test_resolution_forms(value, expected):
    assert parse_resolution(value) == expected


@pytest.mark.parametrize("value", [500, "960x540", "big", [64], 0])
def test_bad_resolution_is_rejected(value):
    with pytest.raises(ValueError):
        parse_resolution(value)


def test_general_merges_into_entries_and_cache_defaults_to_media(tmp_path):
    specs = _specs({
        "general": {"resolution": "64x48", "batch_size": 2, "target_frames": [16, 17, 33]},
        "train": [{"video_directory": "v", "batch_size": 3}, {"image_directory": "i", "cache_directory": "c"}],
    }, tmp_path)
    assert [s.batch_size for s in specs] == [3, 2]
    assert specs[0].resolution == (64, 48) and specs[0].target_frames == (13, 17, 33)
    assert specs[0].cache_directory == tmp_path / "v" and specs[1].cache_directory == tmp_path / "c"
    assert specs[0].is_video and not specs[1].is_video and specs[1].name == "datasets.train[1]"


def test_blueprint_problems_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"datasets": {
            "train": [{"image_directory": "a"}, {"image_directory": "a", "resolution": "100x100"},
                      {"video_directory": "v", "frame_stride": 4}, {"image_directory": "b", "target_frames": [17]},
                      {"image_directory": "d", "bucket_no_upscale": True}],
            "val": [{"video_directory": "x", "cache_directory": "b"}],
        }}, config_dir=tmp_path)
    text = "\n".join(err.value.problems)
    assert "`datasets.train[1]` and `datasets.train[0]` share the cache folder" in text
    assert "`datasets.val[0]` and `datasets.train[3]` share the cache folder" in text
    assert "`datasets.train[1].resolution`" in text and "multiple of 16" in text
    assert "`datasets.train[2].frame_stride` only applies to frame_extraction = \"slide\"" in text
    assert "`datasets.train[3]` is an image dataset: `target_frames`" in text
    assert "`bucket_no_upscale` needs `enable_bucket = true`" in text
    assert len(err.value.problems) == 6


# --- buckets ---------------------------------------------------------------------------------------------


def test_bucket_list_for_256_square():
    assert bucket_resolutions((256, 256)) == [
        (128, 512), (144, 448), (160, 400), (176, 368), (192, 336), (208, 304), (224, 288), (240, 272),
        (256, 256), (272, 240), (288, 224), (304, 208), (336, 192), (368, 176), (400, 160), (448, 144), (512, 128),
    ]


@pytest.mark.parametrize(
    ("resolution", "no_upscale", "source", "bucket"),
    [((256, 256), False, (512, 256), (368, 176)), ((256, 256), False, (256, 512), (176, 368)),
     ((256, 256), False, (300, 300), (256, 256)), ((832, 480), False, (1920, 1080), (832, 480)),
     ((832, 480), False, (1080, 1920), (480, 832)), ((256, 256), True, (100, 60), (96, 48)),
     ((256, 256), True, (1000, 1000), (256, 256)), ((64, 64), False, (96, 64), (80, 48))],
)
def test_bucket_selection(resolution, no_upscale, source, bucket):
    assert BucketSelector(resolution, enable_bucket=True, no_upscale=no_upscale).select(source) == bucket


def test_bucketing_off_is_one_bucket():
    selector = BucketSelector((64, 48), enable_bucket=False)
    assert selector.buckets == [(64, 48)] and selector.select((1000, 10)) == (64, 48)


def test_resize_covers_then_centre_crops():
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, 25:75] = 255  # white middle half: exactly what a centre crop to a square keeps
    out = resize_to_bucket(Image.fromarray(array), (32, 32))
    assert out.size == (32, 32) and np.asarray(out).min() >= 250
    up = resize_to_bucket(Image.fromarray(array[:, :50]), (160, 96))  # 50x50 -> 160x160 Lanczos, crop rows
    assert up.size == (160, 96)


# --- frame windows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [("head", {}, [(0, 17)]), ("middle", {}, [(11, 17)]), ("chunk", {}, [(0, 17), (17, 17)]),
     ("slide", {"frame_stride": 10}, [(0, 17), (10, 17), (20, 17)]),
     ("uniform", {"frame_sample": 3}, [(0, 17), (11, 17), (23, 17)]),
     ("full", {}, [(0, 37)]), ("full", {"max_frames": 30}, [(0, 29)])],
)
def test_frame_modes_on_40_frames(mode, kwargs, expected):
    assert frame_windows(40, mode, [17], **kwargs) == expected


def test_frame_targets_rounded_and_too_short():
    assert frame_windows(40, "head", [1, 4, 5, 16]) == [(0, 1), (0, 5), (0, 13)]
    assert frame_windows(20, "chunk", [9, 33]) == [(0, 9), (9, 9)]
    assert frame_windows(10, "head", [17]) == []
    assert frame_windows(10, "uniform", [9], frame_sample=4) == [(0, 9), (1, 9)]


def test_source_fps_resampling():
    assert resampled_indices(30, 30.0) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28]
    assert resampled_indices(5, 8.0) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert resampled_indices(4, None) == [0, 1, 2, 3]


# --- sources ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    """Synthetic set with a corrupt image, a truncated mp4, a 5-frame clip and one missing caption."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("bad"), seed=3, num_images=3, num_videos=2,
                                  video_frames=(17, 21), with_corrupt_image=True, with_truncated_video=True,
                                  with_short_video=True)
    (data.image_dir / "image_001.txt").unlink()
    return data


def test_image_directory_scan(bad_media):
    spec, = _specs({"train": [{"image_directory": str(bad_media.image_dir), "resolution": 64, "enable_bucket": True}]},
                   bad_media.root)
    scan = scan_dataset(spec)
    assert [i.key for i in scan.items] == ["image_000", "image_001", "image_002"]
    assert [s.path.name for s in scan.skipped] == ["broken.png"] and "unreadable image" in scan.skipped[0].reason
    assert scan.missing_captions == [bad_media.image_dir / "image_001.png"]
    item0, item1 = scan.items[:2]
    assert item0.caption == bad_media.captions[bad_media.image_dir / "image_000.png"]
    assert item1.caption == "" and item1.caption_missing
    # musubi-tuner's name: the source size (96x64), not the bucket (80x48); the latents must hold the bucket / 8
    assert (item0.bucket, item0.cache_size, item0.latent_shape) == ((80, 48), (96, 64), (1, 6, 10))
    assert item0.latent_cache_path == bad_media.image_dir / "image_000_0096x0064_wan.safetensors"
    assert item0.text_cache_path == bad_media.image_dir / "image_000_wan_te.safetensors"
    pixels = item0.load_pixels()
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 1, item0.bucket[1], item0.bucket[0])
    assert -1.0 <= pixels.min() < pixels.max() <= 1.0


def test_video_directory_skips_truncated_and_short(bad_media):
    spec, = _specs({"train": [{"video_directory": str(bad_media.video_dir), "resolution": [64, 64],
                               "target_frames": [9, 17]}]}, bad_media.root)
    scan = scan_dataset(spec)
    assert [i.key for i in scan.items] == ["clip_000_00000-009", "clip_000_00000-017",
                                           "clip_001_00000-009", "clip_001_00000-017"]
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {"short.mp4", "truncated.mp4"}
    assert reasons["short.mp4"].startswith("too short: 5 frames") and "unreadable video" in reasons["truncated.mp4"]
    assert scan.frame_counts[bad_media.short_video] == 5
    item = scan.items[1]
    # a 96x64 clip: musubi-tuner reads video frames into the bucket of their size with bucketing on (80x48) and
    # names the cache with that size, although this dataset (enable_bucket off) trains it at 64x64
    assert (item.bucket, item.cache_size, item.latent_shape) == ((64, 64), (80, 48), (5, 8, 8))
    assert item.latent_cache_path.name == "clip_000_00000-017_0080x0048_wan.safetensors"
    assert item.text_cache_path.name == "clip_000_wan_te.safetensors"
    assert item.load_pixels().shape == (3, 17, 64, 64)


def test_jsonl_sources_match_directory(bad_media):
    spec, = _specs({"train": [{"image_jsonl_file": str(bad_media.image_jsonl), "resolution": 64,
                               "cache_directory": str(bad_media.root / "cache")}]}, bad_media.root)
    scan = scan_dataset(spec)
    assert [i.key for i in scan.items] == ["image_000", "image_001", "image_002"]
    assert all(i.caption == bad_media.captions[i.path] for i in scan.items)  # caption from the JSONL, not .txt
    assert scan.items[0].latent_cache_path.parent == bad_media.root / "cache"
    assert [s.path.name for s in scan.skipped] == ["broken.png"]


def test_jsonl_bad_lines_and_missing_files(tmp_path):
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "a.png")
    lines = [json.dumps({"image_path": "a.png"}), "{not json", json.dumps({"caption": "x"}),
             json.dumps({"image_path": "gone.png", "caption": "y"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    spec, = _specs({"train": [{"image_jsonl_file": "list.jsonl", "resolution": 32}]}, tmp_path)
    scan = scan_dataset(spec)
    assert [i.key for i in scan.items] == ["a"] and scan.missing_captions == [tmp_path / "a.png"]
    assert [s.reason.split(" (")[0] for s in scan.skipped] == [
        "line 2: not JSON", 'line 3: no "image_path" string', "file not found"]


def test_missing_folder_is_a_user_error(tmp_path):
    spec, = _specs({"train": [{"image_directory": "nowhere"}]}, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(spec)


def test_stem_collision_is_skipped(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    spec, = _specs({"train": [{"image_directory": ".", "resolution": 32}]}, tmp_path)
    scan = scan_dataset(spec)
    assert [i.path.name for i in scan.items] == ["x.jpg"] and "collide" in scan.skipped[0].reason


def _grey_frames(count: int, size=(32, 32)) -> list[np.ndarray]:
    return [np.full((size[1], size[0], 3), 8 * i, dtype=np.uint8) for i in range(count)]


def test_slide_windows_load_the_right_frames(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    write_mp4(folder / "ramp.mp4", _grey_frames(21))
    spec, = _specs({"train": [{"video_directory": "v", "resolution": 32, "target_frames": [17],
                               "frame_extraction": "slide", "frame_stride": 4}]}, tmp_path)
    first, second = scan_dataset(spec).items
    assert (first.key, second.key) == ("ramp_00000-017", "ramp_00004-017")
    a, b = first.load_pixels(), second.load_pixels()
    torch.testing.assert_close(a[:, 4:], b[:, :13], atol=0.02, rtol=0)
    grey = (a[0, :, 16, 16] + 1) * 127.5
    assert torch.allclose(grey, torch.arange(17) * 8.0, atol=3)


def test_frame_folder_with_source_fps(tmp_path):
    folder = tmp_path / "v" / "steps"
    folder.mkdir(parents=True)
    for i, array in enumerate(_grey_frames(18, size=(48, 32))):
        Image.fromarray(array).save(folder / f"f{i:03d}.png")
    (tmp_path / "v" / "steps.txt").write_text("grey steps")
    spec, = _specs({"train": [{"video_directory": "v", "resolution": [48, 32], "target_frames": [9],
                               "source_fps": 32}]}, tmp_path)
    scan = scan_dataset(spec)
    item, = scan.items
    assert (item.key, item.caption, scan.frame_counts[folder]) == ("steps_00000-009", "grey steps", 9)
    grey = (item.load_pixels()[0, :, 0, 0] + 1) * 127.5
    assert torch.allclose(grey, torch.arange(0, 18, 2) * 8.0, atol=0.01)


def test_synthetic_media_is_deterministic(tmp_path, synthetic_media):
    again = make_synthetic_dataset(tmp_path, seed=0)
    for path, caption in synthetic_media.captions.items():
        twin = again.root / path.relative_to(synthetic_media.root)
        assert again.captions[twin] == caption and twin.read_bytes() == path.read_bytes()
    assert len(synthetic_media.video_frames) == 3 and all(17 <= n <= 33 for n in synthetic_media.video_frames.values())
    assert all(" moving " in synthetic_media.captions[p] for p in synthetic_media.video_frames)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (64, 32), (250, 0, 0))
    image.paste((0, 0, 250), (0, 0, 32, 32))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: left half ends up on top
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    spec, = _specs({"train": [{"image_directory": ".", "resolution": [32, 64]}]}, tmp_path)
    item, = scan_dataset(spec).items
    pixels = item.load_pixels()
    assert pixels.shape == (3, 1, 64, 32)
    assert pixels[2, 0, 8, 16] > 0.8 and pixels[0, 0, 56, 16] > 0.8  # blue on top, red below
