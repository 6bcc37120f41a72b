"""Reading images, video files (PyAV) and frame folders. Every failure becomes a ``MediaError``."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
_READ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, SyntaxError, UnidentifiedImageError, av.FFmpegError,
                Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def frame_folder_files(path: Path) -> list[Path]:
    """The image files of a frame folder, in name order (empty when ``path`` is not one)."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if is_image_file(p))


def list_media(folder: Path, is_video: bool) -> list[Path]:
    """The media directly in ``folder``, in name order: video files and frame folders, or image files."""
    entries = sorted(folder.iterdir())
    if is_video:
        return [p for p in entries if is_video_file(p) or frame_folder_files(p)]
    return [p for p in entries if is_image_file(p)]


def broken_links(folder: Path, is_video: bool) -> list[Path]:
    """Symbolic links in ``folder`` with a media extension whose target does not exist (reported, not used)."""
    extensions = VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS
    return sorted(p for p in folder.iterdir()
                  if p.is_symlink() and not p.exists() and p.suffix.lower() in extensions)


def pixel_limit_text() -> str:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    side = int(limit ** 0.5)
    return f"{limit:,} pixels, about {side:,}x{side:,}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, scaling high bit depths instead of clipping them.

    ``I;16*`` (16-bit grayscale) is divided by 257; ``I`` (32-bit integers, how Pillow opens some 16-bit files)
    is scaled from 0..65535 when a value exceeds 255; ``F`` from 0..1 when every value is within it, else 0..255.
    Every other mode (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, 16-bit RGB, which Pillow opens as RGB) goes
    through ``convert("RGB")``.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and values.size and values.max() > 255):
            values = values / 257.0
        elif image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1.0:
            values = values * 255.0
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    return image.convert("RGB")


def no_media_message(folder: Path, is_video: bool) -> str:
    """Why a media folder without media is a mistake, and what to do (names the other key when it fits)."""
    kind, key, extensions = ("video", "video_directory", VIDEO_EXTENSIONS) if is_video else (
        "image", "image_directory", IMAGE_EXTENSIONS)
    found = f"no {kind} files ({' '.join(e.lstrip('.') for e in extensions)}"
    found += " or folders of frames)" if is_video else ")"
    others = list_media(folder, not is_video)
    if others:
        other_kind, other_key = ("image", "image_directory") if is_video else ("video", "video_directory")
        return (f"{found} in {folder}, but {len(others)} {other_kind} file(s): write `{other_key}` for "
                f"this folder instead of `{key}`")
    return f"{found} in {folder}: put the {kind}s and their captions there, or point `{key}` at their folder"


@dataclass(frozen=True)
class VideoInfo:
    frame_count: int
    width: int
    height: int


def _image_error(exc: BaseException) -> MediaError:
    if isinstance(exc, Image.DecompressionBombError):
        return MediaError(f"image too large to decode safely ({exc}); the limit is {pixel_limit_text()}: "
                          "downscale it (training resolutions are far smaller)")
    return MediaError(f"unreadable image ({type(exc).__name__}: {exc})")


def probe_image(path: Path, *, decode: bool = False) -> tuple[int, int]:
    """(width, height) of an image as shown (EXIF rotation applied). Checks the file without decoding pixels,
    or, with ``decode``, decodes them all (what caching will do: finds truncated JPEGs that ``verify`` passes)."""
    try:
        with Image.open(path) as image:
            image.verify()  # must come first on a freshly opened file
        with Image.open(path) as image:
            if decode:
                image.load()
            size = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                size = (size[1], size[0])
    except _READ_ERRORS as exc:
        raise _image_error(exc) from None
    if size[0] <= 0 or size[1] <= 0:
        raise MediaError(f"image has no pixels ({size[0]}x{size[1]})")
    return size


def load_image(path: Path) -> Image.Image:
    """The decoded 8-bit RGB image (see ``to_rgb``), turned upright by its EXIF orientation."""
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except _READ_ERRORS as exc:
        raise MediaError(f"{path}: {_image_error(exc)}") from None


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


_pass_lock = threading.Lock()
_pass_counters: list[Counter] = []


@contextmanager
def count_decode_passes() -> Iterator[Counter]:
    """Count the decoding passes over each video file or frame folder (by path) started inside the block.

    For tests and benches: one pass is one ``iter_video_frames`` call, however many frames it reads.
    """
    counter: Counter = Counter()
    with _pass_lock:
        _pass_counters.append(counter)
    try:
        yield counter
    finally:
        with _pass_lock:
            _pass_counters.remove(counter)


def _note_pass(path: Path) -> None:
    with _pass_lock:
        for counter in _pass_counters:
            counter[path] += 1


def _missing_frame(path: Path, index: int) -> MediaError:
    return MediaError(f"{path}: frame {index} could not be decoded (the file is shorter than its header says)")


def iter_video_frames(path: Path, indices: Iterable[int]) -> Iterator[tuple[int, Image.Image]]:
    """``(frame number, RGB frame)`` for each distinct source frame number in ``indices``, ascending, decoded in
    one pass from the start of the file (frames nobody asked for are decoded but not converted). Raises
    ``MediaError`` when the file cannot be read or ends before the last wanted frame."""
    wanted = sorted(set(indices))
    if not wanted:
        return
    _note_pass(path)
    if path.is_dir():
        files = frame_folder_files(path)
        for i in wanted:
            if i >= len(files):
                raise _missing_frame(path, i)
            yield i, load_image(files[i])
        return
    wanted_set, last, found = set(wanted), wanted[-1], 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted_set:
                    found += 1
                    yield number, frame.to_image().convert("RGB")
                if number >= last:
                    break
    except _READ_ERRORS as exc:
        raise MediaError(f"{path}: unreadable video ({type(exc).__name__}: {exc})") from None
    if found < len(wanted):
        raise _missing_frame(path, wanted[found])


def read_video_frames(path: Path, indices: list[int]) -> list[Image.Image]:
    """The RGB frames at ``indices`` (source frame numbers, ascending, repeats allowed)."""
    found = dict(iter_video_frames(path, indices))
    return [found[i] for i in indices]


def frames_to_tensor(frames: list[Image.Image]) -> torch.Tensor:
    """RGB frames -> float32 [3, F, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])  # [F, H, W, 3]
    tensor = torch.from_numpy(array).permute(3, 0, 1, 2).contiguous()  # [3, F, H, W]
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)
