"""Sample writers: mp4 read back with PyAV (size, frame count, fps, pixels), png with Pillow, names."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from wantrainer.sampling.writers import (
    read_video_frames,
    sample_stem,
    to_uint8_frames,
    video_codec,
    write_sample,
)


def _smooth_video(frames: int, height: int, width: int) -> torch.Tensor:
    """A moving gradient in [-1, 1], [3, F, H, W]: smooth, so lossy coding stays close."""
    y = torch.linspace(-1, 1, height)[:, None]
    x = torch.linspace(-1, 1, width)[None, :]
    zero = 0 * x + 0 * y
    channels = [
        torch.stack([torch.sin(3 * x + f * 0.3 + y), torch.cos(2 * y - f * 0.2) + zero, 0.5 * x + zero])
        for f in range(frames)
    ]
    out = torch.stack(channels, dim=1)
    return out.clamp(-1, 1)


def test_to_uint8_frames_range_and_layout():
    px = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4).expand(3, 1, 1, 4)
    out = to_uint8_frames(px[None])
    assert out.shape == (1, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError):
        to_uint8_frames(torch.zeros(4, 1, 8, 8))


def test_mp4_roundtrip(tmp_path):
    frames = to_uint8_frames(_smooth_video(9, 48, 64))
    path = write_sample(tmp_path, sample_stem("run", 3, 42, step=120), frames)
    assert path.name == "run_step00000120_p03_s42.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == Fraction(16, 1)
    back = read_video_frames(path)
    assert back.shape == (9, 48, 64, 3)
    assert np.abs(back.astype(np.int16) - frames.astype(np.int16)).mean() < 4.0
    assert video_codec() in ("libx264", "mpeg4")
    assert not list(tmp_path.glob(".*.tmp"))


def test_single_frame_is_png(tmp_path):
    frames = to_uint8_frames(_smooth_video(1, 32, 48))
    path = write_sample(tmp_path, sample_stem("run", 0, 7), frames)
    assert path.name == "run_p00_s7.png"
    with Image.open(path) as img:
        assert img.size == (48, 32)
        assert np.array_equal(np.asarray(img.convert("RGB")), frames[0])


def test_mp4_is_bt709_limited_range_and_tagged(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 200, 30, 100
    path = write_sample(tmp_path, "colour", frames)
    with av.open(str(path)) as container:
        context = container.streams.video[0].codec_context
        tags = (context.colorspace, context.color_primaries, context.color_trc, context.color_range)
        luma = next(container.decode(video=0)).to_ndarray()[0, 0]  # the Y plane of yuv420p
    assert tags == (1, 1, 1, 1)  # BT.709 matrix / primaries / transfer, MPEG (limited) range
    r, g, b = 200 / 255, 30 / 255, 100 / 255
    assert abs(int(luma) - (16 + 219 * (0.2126 * r + 0.7152 * g + 0.0722 * b))) <= 1  # BT.709, not BT.601 (92)
    assert np.abs(read_video_frames(path)[1].astype(int) - frames[1]).max() <= 3
