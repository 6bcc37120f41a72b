"""Reading images, video files (PyAV) and frame folders. Every failure becomes a ``MediaError``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MediaError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height when applied."""
_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, SyntaxError, UnidentifiedImageError, av.FFmpegError)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def frame_folder_files(path: Path) -> list[Path]:
    """The image files of a frame folder, in name order (empty when ``path`` is not one)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if is_image_file(p))


@dataclass(frozen=True)
class VideoInfo:
    frame_count: int
    width: int
    height: int


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image as shown (EXIF rotation applied); checks the file without decoding pixels."""
    try:
        with Image.open(path) as image:
            image.verify()  # must come first on a freshly opened file
        with Image.open(path) as image:
            size = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                size = (size[1], size[0])
    except _READ_ERRORS as exc:
        raise MediaError(f"unreadable image ({type(exc).__name__}: {exc})") from None
    if size[0] <= 0 or size[1] <= 0:
        raise MediaError(f"image has no pixels ({size[0]}x{size[1]})")
    return size


def load_image(path: Path) -> Image.Image:
    """The decoded RGB image, turned upright by its EXIF orientation."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except _READ_ERRORS as exc:
        raise MediaError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def probe_video(path: Path) -> VideoInfo:
    """Frame count and size of a video file or frame folder (packets are counted, not decoded)."""
    if path.is_dir():
        files = frame_folder_files(path)
        if not files:
            raise MediaError("frame folder holds no images")
        width, height = probe_image(files[0])
        return VideoInfo(len(files), width, height)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except _READ_ERRORS as exc:
        raise MediaError(f"unreadable video ({type(exc).__name__}: {exc})") from None
    if count == 0 or width <= 0 or height <= 0:
        raise MediaError("video holds no frames")
    return VideoInfo(count, width, height)


def read_video_frames(path: Path, indices: list[int]) -> list[Image.Image]:
    """The RGB frames at ``indices`` (source frame numbers, ascending, repeats allowed)."""
    if not indices:
        return []
    wanted = sorted(set(indices))
    wanted_set = set(wanted)
    found: dict[int, Image.Image] = {}
    if path.is_dir():
        files = frame_folder_files(path)
        for i in wanted:
            if i >= len(files):
                break
            found[i] = load_image(files[i])
    else:
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for number, frame in enumerate(container.decode(stream)):
                    if number in wanted_set:
                        found[number] = frame.to_image().convert("RGB")
                    if number >= wanted[-1]:
                        break
        except _READ_ERRORS as exc:
            raise MediaError(f"{path}: unreadable video ({type(exc).__name__}: {exc})") from None
    missing = [i for i in wanted if i not in found]
    if missing:
        raise MediaError(f"{path}: frame {missing[0]} could not be decoded (the file is shorter than its header says)")
    return [found[i] for i in indices]


def frames_to_tensor(frames: list[Image.Image]) -> torch.Tensor:
    """RGB frames -> float32 [3, F, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])  # [F, H, W, 3]
    tensor = torch.from_numpy(array).permute(3, 0, 1, 2).contiguous()  # [3, F, H, W]
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)
