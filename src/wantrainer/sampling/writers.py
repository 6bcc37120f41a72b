"""Sample files: mp4 (PyAV, H.264 yuv420p at the model's 16 fps, 24 for the TI2V-5B) for videos, png (Pillow)
for single frames.

The mp4 is converted with the BT.709 matrix to limited ("tv", 16-235) range and tagged so (primaries, transfer,
matrix, range): untagged yuv is read as BT.601 by some players and BT.709 by others, which shifts the colours.

Files are written atomically (temp file + rename). Names carry the step, the prompt index and the seed:
``{name}_step{step:08d}_p{index:02d}_s{seed}.mp4``.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from ..utils.atomic import atomic_path

SAMPLE_FPS = 16
_PREFERRED_CODECS = ("libx264", "mpeg4")
_BT709 = 1  # AVCOL_PRI_BT709 / AVCOL_TRC_BT709 / AVCOL_SPC_BT709


def sample_stem(name: str, prompt_index: int, seed: int, step: int | None = None) -> str:
    """File stem of a sample: ``{name}_step{step:08d}_p{index:02d}_s{seed}`` (no step part when None)."""
    step_part = f"_step{step:08d}" if step is not None else ""
    return f"{name}{step_part}_p{prompt_index:02d}_s{seed}"


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [3, F, H, W] (or [1, 3, F, H, W]) in [-1, 1] -> uint8 frames [F, H, W, 3]."""
    if pixels.ndim == 5:
        if pixels.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise ValueError(f"expected pixels [3, F, H, W], got {tuple(pixels.shape)}")
    scaled = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


@cache
def video_codec() -> str:
    """The mp4 encoder this PyAV build offers: libx264 when present, else mpeg4."""
    for name in _PREFERRED_CODECS:
        try:
            av.Codec(name, "w")
        except Exception:  # noqa: BLE001 - PyAV raises several types for a missing codec
            continue
        return name
    raise RuntimeError("this PyAV build has neither libx264 nor mpeg4 to write mp4 samples")


def write_png(path: str | Path, frame: np.ndarray) -> Path:
    """Write one uint8 frame [H, W, 3] as a png."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(frame, mode="RGB").save(tmp, format="PNG")
    return path


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = SAMPLE_FPS) -> Path:
    """Write uint8 frames [F, H, W, 3] as an mp4 (yuv420p BT.709 limited range, ``video_codec()``)."""
    path = Path(path)
    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p video needs an even size, got {width}x{height}")
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(video_codec(), rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            context = stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = _BT709
            context.color_range = int(ColorRange.MPEG)
            if stream.codec_context.name == "libx264":
                stream.options = {"crf": "18", "preset": "medium"}
            else:
                stream.bit_rate = max(1_000_000, width * height * fps * 2)
            for index in range(count):
                frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24").reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
                )
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def write_sample(out_dir: str | Path, stem: str, frames: np.ndarray, fps: int = SAMPLE_FPS) -> Path:
    """Write a png for one frame, an mp4 at ``fps`` otherwise (24 for the TI2V-5B); returns the file path."""
    out_dir = Path(out_dir)
    if frames.shape[0] == 1:
        return write_png(out_dir / f"{stem}.png", frames[0])
    return write_mp4(out_dir / f"{stem}.mp4", frames, fps=fps)


def read_video_frames(path: str | Path) -> np.ndarray:
    """Read an mp4 back as uint8 frames [F, H, W, 3] (used by tests and tools)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
