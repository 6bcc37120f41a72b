"""What ``doctor`` shows besides text: a contact sheet of items as the model sees them, and clip frame rates.

The contact sheet takes a few items of each bucket and decodes them with the caching code itself
(``windows.window_pixels``: the same resize, crop and frame selection as ``cache-latents``), so what it shows is
what gets encoded: the image, or the first, middle and last frame of each video window, with the bucket, the
window and the first words of the caption. For a dataset with masks, a second sheet shows the same frames with
the mask as the loss sees it laid over them (``masked_item_frames``: the latent-resolution weights of
``dataset.masks``, one value per 8 x 8 cell and latent frame, drawn at pixel size; what is not learnt is darkened
and tinted red).
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..utils.atomic import atomic_path
from .sources import MediaItem
from .windows import source_key, window_pixels

WAN_FPS = 16
ITEMS_PER_BUCKET = 3
MAX_ROWS = 24
_CAPTION_WORDS = 8


def sheet_items(items: list[MediaItem], per_bucket: int = ITEMS_PER_BUCKET, max_rows: int = MAX_ROWS) -> list[MediaItem]:
    """Up to ``per_bucket`` items of each bucket (sources spread out), at most ``max_rows`` in all."""
    by_bucket: dict[tuple[int, int], list[MediaItem]] = defaultdict(list)
    for item in items:
        by_bucket[item.bucket].append(item)
    picked: list[MediaItem] = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        step = max(1, len(group) // per_bucket)
        picked.extend(group[::step][:per_bucket])
    return picked[:max_rows]


def item_frames(items: list[MediaItem]) -> list[tuple[MediaItem, list[np.ndarray] | str]]:
    """Each item with its frames as uint8 [H, W, 3] (image: one; video window: first, middle, last), or the
    error text when its media cannot be read."""
    from ..sampling.writers import to_uint8_frames

    by_source: dict[tuple[Path, float | None], list[MediaItem]] = defaultdict(list)
    for item in items:
        by_source[source_key(item)].append(item)
    found: dict[str, list[np.ndarray] | str] = {}
    for group in by_source.values():
        for item, pixels in window_pixels(group):
            if isinstance(pixels, Exception):
                found[item.key] = str(pixels)
                continue
            frames = to_uint8_frames(pixels)
            found[item.key] = [frames[i] for i in frame_picks(frames.shape[0])]
    return [(item, found.get(item.key, "not decoded")) for item in items]


def frame_picks(count: int) -> list[int]:
    """The frames a sheet shows of a window of ``count`` frames: the first, middle and last (an image: its one)."""
    return [0] if count == 1 else [0, count // 2, count - 1]


def overlay_mask(frame: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``frame`` uint8 [H, W, 3] with ``weights`` [H, W] in [0, 1] over it: 1 unchanged, 0 dark red."""
    w = weights[..., None].astype(np.float32)
    out = frame.astype(np.float32) * (w + (1.0 - w) * 0.3) + (1.0 - w) * np.array([120.0, 0.0, 0.0])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def masked_item_frames(items: list[MediaItem]) -> list[tuple[MediaItem, list[np.ndarray] | str]]:
    """``item_frames`` with each item's latent-resolution mask over its frames (pixel frame ``p`` shows latent
    frame 0 for ``p = 0``, else ``(p + 3) // 4``), or the text saying why it has none."""
    from .masks import latent_masks

    by_source: dict[tuple[Path, float | None], list[MediaItem]] = defaultdict(list)
    for item in items:
        if item.mask_path is not None:
            by_source[source_key(item)].append(item)
    masks = {item.key: result for group in by_source.values() for item, result in latent_masks(group)}
    rows: list[tuple[MediaItem, list[np.ndarray] | str]] = []
    for item, frames in item_frames(items):
        mask = masks.get(item.key)
        if item.mask_path is None:
            rows.append((item, f"trained unmasked: {item.mask_problem}"))
        elif isinstance(frames, str) or isinstance(mask, Exception) or mask is None:
            rows.append((item, frames if isinstance(frames, str) else str(mask)))
        else:
            cells = mask.numpy()
            scale = frames[0].shape[0] // cells.shape[1]
            picks = frame_picks(item.frames or 1)
            rows.append((item, [overlay_mask(frame, cells[0 if p == 0 else (p + 3) // 4].repeat(scale, 0)
                                             .repeat(scale, 1)) for frame, p in zip(frames, picks)]))
    return rows


def _label(item: MediaItem) -> str:
    words = item.caption.split()
    caption = " ".join(words[:_CAPTION_WORDS]) + (" ..." if len(words) > _CAPTION_WORDS else "")
    where = f"{item.path.name}" + (f" frames {item.start}-{item.start + item.frames - 1}" if item.is_video else "")
    return f"{item.bucket[0]}x{item.bucket[1]}  {where}\n\"{caption or '(no caption)'}\""


def write_contact_sheet(title: str, rows: list[tuple[MediaItem, list[np.ndarray] | str]], path: Path) -> None:
    """One row per item: its frames side by side, the bucket, the window and the caption's first words."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    columns = max((len(f) for _, f in rows if not isinstance(f, str)), default=1)
    figure = Figure(figsize=(max(5.0, 2.6 * columns + 0.2), 2.3 * max(1, len(rows)) + 0.5), layout="constrained")
    grid = figure.subplots(max(1, len(rows)), columns, squeeze=False)
    names = ["first", "middle", "last"] if columns == 3 else [""]
    for row, (item, frames) in zip(grid, rows):
        for column, axes in enumerate(row):
            axes.set_xticks([])
            axes.set_yticks([])
            if isinstance(frames, str):
                axes.text(0.5, 0.5, frames[:80], ha="center", va="center", fontsize=7, wrap=True)
            elif column < len(frames):
                axes.imshow(frames[column], interpolation="nearest")
                if len(frames) > 1:
                    axes.set_xlabel(names[column], fontsize=7)
            else:
                axes.set_axis_off()
        row[0].set_title(_label(item), fontsize=7, loc="left")
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


def file_fps(path: Path) -> float | None:
    """The frame rate stored in a video file (None for frame folders or when the file has none)."""
    if path.is_dir():
        return None
    try:
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
    except Exception:  # noqa: BLE001 - unreadable files are reported by the scan itself
        return None
    return float(Fraction(rate)) if rate else None


def off_rate_videos(paths: list[Path], tolerance: float = 0.05, model_fps: float = WAN_FPS
                    ) -> list[tuple[Path, float]]:  # fmt: skip
    """Videos whose file frame rate is not the model's (Wan's 16 fps; 24 for the TI2V-5B), relative ``tolerance``."""
    found = []
    for path in sorted(set(paths)):
        fps = file_fps(path)
        if fps is not None and abs(fps - model_fps) > tolerance * model_fps:
            found.append((path, fps))
    return found


def fps_warning(name: str, off: list[tuple[Path, float]], model_fps: float = WAN_FPS) -> str:
    rates = sorted({round(fps, 3) for _, fps in off})
    example = off[0]
    speed = example[1] / model_fps
    motion = f"{speed:.2g}x slower" if speed > 1 else f"{1 / speed:.2g}x faster"
    return (f"{len(off)} video(s) are not {model_fps:g} fps ({', '.join(f'{r:g}' for r in rates)} fps, e.g. "
            f"{example[0].name}) and `source_fps` is unset: their frames are taken one by one, so they train in "
            f"{'slow' if speed > 1 else 'fast'} motion ({motion} than real time at the model's {model_fps:g} fps); "
            f"set source_fps = {rates[0]:g} in {name} to resample them to {model_fps:g} fps")
