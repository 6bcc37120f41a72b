"""Many windows of one video from one decoding pass: the same pixels as ``load_pixels`` window by window."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from wantrainer.config_parser import parse_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.media import count_decode_passes
from wantrainer.dataset.sources import scan_dataset
from wantrainer.dataset.windows import window_pixels
from wantrainer.devkit.synthetic import make_synthetic_dataset
from wantrainer.errors import MediaError


def _items(root: Path, folder: str, **entry):
    datasets = {"train": [{"video_directory": folder, "cache_directory": "cache", "resolution": [48, 32], **entry}]}
    spec, = resolve_datasets(parse_config({"datasets": datasets}, config_dir=root).datasets, "train")
    return scan_dataset(spec).items


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """One 41-frame mp4 of moving shapes (resized and cropped to 48x32) and the same frames as a frame folder."""
    root = tmp_path_factory.mktemp("windows")
    media = make_synthetic_dataset(root, seed=5, num_images=0, num_videos=1, video_frames=(41, 41))
    (video,) = media.video_dir.glob("*.mp4")
    frames = root / "folder" / "frames"
    frames.mkdir(parents=True)
    for i, image in enumerate(_decode_all(video)):
        image.save(frames / f"{i:03d}.png")
    return root


def _decode_all(video: Path) -> list[Image.Image]:
    import av

    with av.open(str(video)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


@pytest.mark.parametrize(("folder", "entry"), [
    ("videos", {"frame_extraction": "slide", "frame_stride": 4, "target_frames": [9, 17]}),
    ("videos", {"frame_extraction": "uniform", "frame_sample": 4, "target_frames": [13], "source_fps": 10}),
    ("videos", {"frame_extraction": "chunk", "target_frames": [9], "source_fps": 24, "enable_bucket": True}),
    ("folder", {"frame_extraction": "slide", "frame_stride": 8, "target_frames": [17]}),
])
def test_one_pass_gives_the_pixels_of_each_window(clip, folder, entry):
    items = _items(clip, folder, **entry)
    assert len(items) >= 3
    path = items[0].path
    with count_decode_passes() as passes:
        loaded = list(window_pixels(items))
    assert passes == {path: 1}
    assert sorted(item.key for item, _ in loaded) == sorted(item.key for item in items)
    with count_decode_passes() as passes:
        for item, pixels in loaded:
            assert torch.equal(pixels, item.load_pixels()), item.key
    assert passes == {path: len(items)}  # what caching cost before: one pass per window


def test_windows_past_the_end_get_errors_the_others_their_pixels(clip):
    items = _items(clip, "videos", frame_extraction="slide", frame_stride=8, target_frames=[9])
    beyond = dataclasses.replace(items[-1], key="beyond", start=items[-1].start + 40)  # past the timeline
    lying = [dataclasses.replace(item, key=f"lying{i}", source_frame_count=81, start=item.start + 36)
             for i, item in enumerate(items[:2])]  # the header promises frames the file does not have
    results = dict((item.key, result) for item, result in window_pixels(items + [beyond] + lying))
    assert isinstance(results["beyond"], MediaError) and "needs frames" in str(results["beyond"])
    assert isinstance(results["lying1"], MediaError) and "could not be decoded" in str(results["lying1"])
    for item in items:
        assert torch.equal(results[item.key], item.load_pixels())


def test_items_of_two_sources_are_refused(clip):
    items = _items(clip, "videos", target_frames=[9]) + _items(clip, "folder", target_frames=[9])
    with pytest.raises(ValueError, match="one source"):
        list(window_pixels(items))
