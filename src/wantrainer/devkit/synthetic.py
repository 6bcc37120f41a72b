"""Synthetic media for tests and the demo: images and short mp4 clips of moving coloured shapes.

Every file gets a caption that describes it ("a red circle moving left on a blue background"), so a
LoRA trained on it has something to learn. Output is deterministic from ``seed``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
IMAGE_SIZES = ((64, 64), (96, 64), (64, 96))
VIDEO_SIZES = ((64, 64), (96, 64))
FPS = 16


@dataclass
class SyntheticDataset:
    """Paths of a generated set. ``captions`` maps each written media file to its caption."""

    root: Path
    image_dir: Path
    video_dir: Path
    image_jsonl: Path
    video_jsonl: Path
    captions: dict[Path, str] = field(default_factory=dict)
    video_frames: dict[Path, int] = field(default_factory=dict)
    corrupt_image: Path | None = None
    truncated_video: Path | None = None
    short_video: Path | None = None


@dataclass(frozen=True)
class _Scene:
    shape: str
    colour: str
    background: str
    direction: str
    size: tuple[int, int]


def _scene(rng: random.Random, sizes: tuple[tuple[int, int], ...]) -> _Scene:
    colour, background = rng.sample(sorted(COLOURS), 2)
    return _Scene(rng.choice(SHAPES), colour, background, rng.choice(sorted(DIRECTIONS)), rng.choice(sizes))


def _draw(scene: _Scene, centre: tuple[float, float]) -> np.ndarray:
    width, height = scene.size
    image = Image.new("RGB", scene.size, COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    radius = min(width, height) // 5
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)
    return np.asarray(image)


def _video_frames(scene: _Scene, count: int) -> list[np.ndarray]:
    width, height = scene.size
    dx, dy = DIRECTIONS[scene.direction]
    travel = 0.5 * min(width, height)
    frames = []
    for i in range(count):
        progress = i / max(1, count - 1) - 0.5
        frames.append(_draw(scene, (width / 2 + dx * travel * progress, height / 2 + dy * travel * progress)))
    return frames


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar yuv420p [H * 3 / 2, W] in numpy.

    Converting here rather than in libswscale keeps the encoded bytes reproducible: swscale picks SIMD paths
    by buffer alignment, which changes the rounding from one allocation to the next.
    """
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    height, width = y.shape

    def subsample(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [y, subsample(u).reshape(height // 4, width), subsample(v).reshape(height // 4, width)]
    return np.clip(np.rint(np.concatenate(planes, axis=0)), 0, 255).astype(np.uint8)


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Encode RGB frames [H, W, 3] uint8 as an H.264 mp4 (one thread, colour conversion in numpy, so the
    bytes are reproducible)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "12", "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(_rgb_to_yuv420p(array), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_synthetic_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_images: int = 4,
    num_videos: int = 3,
    video_frames: tuple[int, int] = (17, 33),
    with_corrupt_image: bool = False,
    with_truncated_video: bool = False,
    with_short_video: bool = False,
    short_video_frames: int = 5,
) -> SyntheticDataset:
    """Write ``images/``, ``videos/`` (captions beside the files) and ``images.jsonl`` / ``videos.jsonl``.

    Videos have a frame count drawn from ``video_frames`` (inclusive). Optional extras for tests: a corrupt
    image, a truncated mp4 and a clip of ``short_video_frames`` frames (all with captions).
    """
    root = Path(out_dir)
    out = SyntheticDataset(root, root / "images", root / "videos", root / "images.jsonl", root / "videos.jsonl")
    out.image_dir.mkdir(parents=True, exist_ok=True)
    out.video_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_images):
        scene = _scene(rng, IMAGE_SIZES)
        path = out.image_dir / f"image_{i:03d}.png"
        Image.fromarray(_draw(scene, (scene.size[0] / 2, scene.size[1] / 2))).save(path)
        out.captions[path] = f"a {scene.colour} {scene.shape} on a {scene.background} background"
    for i in range(num_videos):
        scene = _scene(rng, VIDEO_SIZES)
        count = rng.randint(*video_frames)
        path = out.video_dir / f"clip_{i:03d}.mp4"
        write_mp4(path, _video_frames(scene, count))
        out.captions[path] = f"a {scene.colour} {scene.shape} moving {scene.direction} on a {scene.background} background"
        out.video_frames[path] = count
    _write_extras(out, rng, with_corrupt_image, with_truncated_video, with_short_video, short_video_frames)
    for path, caption in out.captions.items():
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    _write_jsonl(out)
    return out


def _write_extras(out: SyntheticDataset, rng: random.Random, corrupt: bool, truncated: bool, short: bool,
                  short_frames: int) -> None:
    if corrupt:
        out.corrupt_image = out.image_dir / "broken.png"
        out.corrupt_image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200)))
        out.captions[out.corrupt_image] = "a broken image"
    if truncated:
        out.truncated_video = out.video_dir / "truncated.mp4"
        write_mp4(out.truncated_video, _video_frames(_scene(rng, VIDEO_SIZES), 25))
        data = out.truncated_video.read_bytes()
        out.truncated_video.write_bytes(data[: len(data) // 2])
        out.captions[out.truncated_video] = "a truncated clip"
    if short:
        scene = _scene(rng, VIDEO_SIZES)
        out.short_video = out.video_dir / "short.mp4"
        write_mp4(out.short_video, _video_frames(scene, short_frames))
        out.captions[out.short_video] = f"a {scene.colour} {scene.shape} moving {scene.direction} on a {scene.background} background"
        out.video_frames[out.short_video] = short_frames


def _write_jsonl(out: SyntheticDataset) -> None:
    for jsonl, folder, key in ((out.image_jsonl, out.image_dir, "image_path"), (out.video_jsonl, out.video_dir, "video_path")):
        lines = [
            json.dumps({key: str(path.relative_to(out.root)), "caption": caption})
            for path, caption in out.captions.items()
            if path.parent == folder
        ]
        jsonl.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
