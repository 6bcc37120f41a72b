"""Resolve the dataset blueprint: [datasets.general] defaults merged into each train / val entry.

``resolve_datasets`` turns the validated ``DatasetsConfig`` into one frozen ``DatasetSpec`` per dataset:
resolution parsed to (W, H), target frame counts rounded down to 4n+1, the cache folder defaulted to the
media folder. ``blueprint_problems`` reports the cross-entry problems for the config parser.

The model type decides the latent grid (``models.wan.latent_space``): for TI2V-5B (Wan 2.2 VAE, 16x) every
resolution side must be a multiple of 32 and buckets step by 32, "720p" is Wan 2.2's 1280x704, and ``source_fps``
resamples clips to its 24 fps (16 fps for the other models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config.datasets import DatasetEntry, DatasetsConfig
from ..errors import UserError
from ..models.wan.latent_space import latent_space

Split = Literal["train", "val"]

_SOURCE_KEYS = ("image_directory", "video_directory", "image_jsonl_file", "video_jsonl_file")
_NAMED_RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
RESOLUTION_STEP = 16
"""Width and height must be multiples of this (VAE stride 8 x patch size 2)."""
_VIDEO_ONLY_KEYS = ("target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps")
_MODE_KEYS = {"frame_stride": "slide", "frame_sample": "uniform", "max_frames": "full"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset with every setting resolved."""

    split: Split
    index: int
    image_directory: Path | None
    video_directory: Path | None
    image_jsonl_file: Path | None
    video_jsonl_file: Path | None
    cache_directory: Path
    caption_extension: str
    resolution: tuple[int, int]
    """Target (width, height)."""
    enable_bucket: bool
    bucket_no_upscale: bool
    batch_size: int
    num_repeats: int
    target_frames: tuple[int, ...]
    """Window lengths, each already rounded down to 4n+1, without duplicates."""
    frame_extraction: str
    frame_stride: int
    frame_sample: int
    max_frames: int
    source_fps: float | None
    caption_dropout_rate: float
    is_reg: bool
    mask_directory: Path | None = None
    """Folder of per-item loss masks (``dataset.masks``), or None."""
    mask_missing: str = "skip"
    """What an item without a usable mask does: "skip" (not trained) or "unmasked"."""
    model_fps: float = 16.0
    """Frame rate ``source_fps`` resamples to: the model's (16; 24 for the TI2V-5B)."""
    latent_stride: int = 8
    """Pixels per latent cell in width / height: 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE of TI2V-5B); buckets step by
    twice this (the DiT patchifies by 2)."""

    @property
    def name(self) -> str:
        return f"datasets.{self.split}[{self.index}]"

    @property
    def is_video(self) -> bool:
        return self.video_directory is not None or self.video_jsonl_file is not None

    @property
    def source(self) -> Path:
        """The folder or JSONL file the media comes from."""
        for key in _SOURCE_KEYS:
            value = getattr(self, key)
            if value is not None:
                return value
        raise ValueError(f"{self.name} has no media source")


def round_to_4n1(frames: int) -> int:
    """Round a frame count down to the nearest 4n+1 (1, 5, 9, ...); Wan's VAE packs 4 frames per latent."""
    return max(1, (frames - 1) // 4 * 4 + 1)


def parse_resolution(value: int | str | list[int]) -> tuple[int, int]:
    """(width, height) from 960, "960x544", [960, 544], "480p" or "720p". Raises ValueError when malformed."""
    if isinstance(value, bool):
        raise ValueError(f"resolution {value!r} is not a size")
    if isinstance(value, int):
        width = height = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _NAMED_RESOLUTIONS:
            return _NAMED_RESOLUTIONS[text]
        match = re.fullmatch(r"(\d+)\s*[x\*,]\s*(\d+)", text)
        if match is None:
            raise ValueError(f'resolution {value!r} is not 960, "960x544", [960, 544], "480p" or "720p"')
        width, height = int(match.group(1)), int(match.group(2))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        width, height = int(value[0]), int(value[1])
    else:
        raise ValueError(f"resolution {value!r} must be an integer, \"WxH\" or [width, height]")
    for side in (width, height):
        if side < RESOLUTION_STEP or side % RESOLUTION_STEP:
            near = max(RESOLUTION_STEP, round(side / RESOLUTION_STEP) * RESOLUTION_STEP)
            raise ValueError(
                f"resolution {width}x{height}: each side must be a multiple of {RESOLUTION_STEP} "
                f"(>= {RESOLUTION_STEP}); {side} could be {near}"
            )
    return width, height


def merged_entry(general: DatasetEntry, entry: DatasetEntry) -> DatasetEntry:
    """The entry with every key it does not set taken from ``general``."""
    values = {k: getattr(general, k) for k in general.model_fields_set}
    values.update({k: getattr(entry, k) for k in entry.model_fields_set})
    return DatasetEntry.model_construct(**{**DatasetEntry().model_dump(), **values})


def default_cache_directory(entry: DatasetEntry) -> Path | None:
    """The cache folder: ``cache_directory`` or the media folder (the JSONL file's folder for JSONL)."""
    if entry.cache_directory is not None:
        return Path(entry.cache_directory)
    if entry.image_directory is not None:
        return Path(entry.image_directory)
    if entry.video_directory is not None:
        return Path(entry.video_directory)
    jsonl = entry.image_jsonl_file or entry.video_jsonl_file
    return Path(jsonl).parent if jsonl is not None else None


def _resolution_for(entry: DatasetEntry, name: str, model_type: str) -> tuple[int, int]:
    """The entry's (width, height); for the Wan 2.2 VAE each side a multiple of 32 ("720p" is 1280x704)."""
    space = latent_space(model_type)
    if space.pixel_step == RESOLUTION_STEP:
        return parse_resolution(entry.resolution)
    if isinstance(entry.resolution, str) and entry.resolution.strip().lower() == "720p":
        return 1280, 704  # Wan 2.2 TI2V-5B's 720P size
    width, height = parse_resolution(entry.resolution)
    step = space.pixel_step
    if width % step or height % step:
        near = f"{max(step, width // step * step)}x{max(step, height // step * step)}"
        raise UserError(f"`{name}.resolution` = {width}x{height}: the {model_type} model needs each side a multiple "
                        f"of {step} ({space.spatial_stride}x VAE, patch 2); use e.g. {near}")
    return width, height


def _spec(entry: DatasetEntry, split: Split, index: int, model_type: str = "t2v") -> DatasetSpec:
    cache_directory = default_cache_directory(entry)
    if cache_directory is None:
        raise ValueError(f"datasets.{split}[{index}] has no media source")
    rounded = tuple(dict.fromkeys(round_to_4n1(f) for f in entry.target_frames))
    return DatasetSpec(
        split=split,
        index=index,
        image_directory=entry.image_directory,
        video_directory=entry.video_directory,
        image_jsonl_file=entry.image_jsonl_file,
        video_jsonl_file=entry.video_jsonl_file,
        cache_directory=cache_directory,
        caption_extension=entry.caption_extension,
        resolution=_resolution_for(entry, f"datasets.{split}[{index}]", model_type),
        enable_bucket=entry.enable_bucket,
        bucket_no_upscale=entry.bucket_no_upscale,
        batch_size=entry.batch_size,
        num_repeats=entry.num_repeats,
        target_frames=rounded,
        frame_extraction=entry.frame_extraction,
        frame_stride=entry.frame_stride,
        frame_sample=entry.frame_sample,
        max_frames=entry.max_frames,
        source_fps=entry.source_fps,
        caption_dropout_rate=entry.caption_dropout_rate,
        is_reg=entry.is_reg,
        mask_directory=entry.mask_directory,
        mask_missing=entry.mask_missing,
        latent_stride=latent_space(model_type).spatial_stride,
        model_fps=float(latent_space(model_type).fps),
    )


def resolve_datasets(datasets: DatasetsConfig, split: Split, model_type: str = "t2v") -> list[DatasetSpec]:
    """Every dataset of ``split`` ("train" or "val") with [datasets.general] merged in, for a ``model_type`` DiT
    (its VAE decides the latent grid; a resolution it cannot take is a ``UserError``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return [_spec(merged_entry(datasets.general, raw), split, i, model_type)
            for i, raw in enumerate(getattr(datasets, split))]  # fmt: skip


def _entry_problems(name: str, entry: DatasetEntry, own_keys: set[str]) -> list[str]:
    """A value the entry inherits from [datasets.general] is named there (so it is reported once)."""
    problems: list[str] = []

    def where(key: str) -> str:
        return f"{name}.{key}" if key in own_keys else f"datasets.general.{key}"

    try:
        parse_resolution(entry.resolution)
    except ValueError as exc:
        problems.append(f"`{where('resolution')}`: {exc}")
    if entry.bucket_no_upscale and not entry.enable_bucket:
        problems.append(f"`{name}`: `bucket_no_upscale` needs `enable_bucket = true`")
    if not entry.target_frames or any(f < 1 for f in entry.target_frames):
        problems.append(f"`{where('target_frames')}` must list frame counts >= 1, got {entry.target_frames}")
    if "mask_missing" in own_keys and entry.mask_directory is None:
        problems.append(f"`{name}.mask_missing` only applies with `mask_directory` (this dataset has no masks)")
    media_folder = entry.image_directory or entry.video_directory
    if entry.mask_directory is not None and media_folder is not None and \
            Path(entry.mask_directory).expanduser().resolve() == Path(media_folder).expanduser().resolve():
        problems.append(f"`{where('mask_directory')}` is the media folder: the masks would be read as media; put "
                        "them in a folder of their own")
    is_video = entry.video_directory is not None or entry.video_jsonl_file is not None
    if not is_video:
        wrong = [k for k in _VIDEO_ONLY_KEYS if k in own_keys]
        if wrong:
            problems.append(f"`{name}` is an image dataset: {', '.join(f'`{k}`' for k in wrong)} only apply to videos")
    else:
        for key, mode in _MODE_KEYS.items():
            if key in own_keys and entry.frame_extraction != mode:
                problems.append(
                    f"`{name}.{key}` only applies to frame_extraction = \"{mode}\" "
                    f"(this dataset uses \"{entry.frame_extraction}\")"
                )
    return problems


def blueprint_problems(datasets: DatasetsConfig) -> list[str]:
    """Problems of the blueprint as a whole (each names the entry)."""
    problems: list[str] = []
    cache_owner: dict[Path, str] = {}
    for split in ("train", "val"):
        for index, raw in enumerate(getattr(datasets, split)):
            entry = merged_entry(datasets.general, raw)
            name = f"datasets.{split}[{index}]"
            sources = [k for k in _SOURCE_KEYS if getattr(entry, k) is not None]
            if not sources:
                problems.append(f"`{name}` has no media: set one of {', '.join(_SOURCE_KEYS)}")
                continue
            if len(sources) > 1:
                problems.append(
                    f"`{name}`: {' and '.join(f'`{k}`' for k in sources)} are mutually exclusive; "
                    "use one source per dataset"
                )
            problems.extend(_entry_problems(name, entry, set(raw.model_fields_set)))
            cache = default_cache_directory(entry)
            if cache is None:
                continue
            key = Path(cache).expanduser().resolve()
            if key in cache_owner:
                problems.append(
                    f"`{name}` and `{cache_owner[key]}` share the cache folder {cache}: their caches would "
                    "overwrite each other; give each dataset its own `cache_directory`"
                )
            else:
                cache_owner[key] = name
    return list(dict.fromkeys(problems))
