"""The dataset blueprint: [datasets.general], [[datasets.train]], [[datasets.val]] and the cache settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Section

FrameExtraction = Literal["head", "middle", "chunk", "slide", "uniform", "full"]
Resolution = int | str | list[int]


class DatasetEntry(Section):
    """One dataset; unset keys take their value from [datasets.general], then from these defaults."""

    image_directory: Path | None = None
    """Folder of images (png, jpg, jpeg, webp, bmp) with captions beside them."""
    video_directory: Path | None = None
    """Folder of videos (mp4, webm, mkv, mov, avi) or of frame folders, with captions beside them."""
    image_jsonl_file: Path | None = None
    """JSONL file, one {"image_path": ..., "caption": ...} object a line (relative paths: from the file's folder)."""
    video_jsonl_file: Path | None = None
    """JSONL file, one {"video_path": ..., "caption": ...} object a line (relative paths: from the file's folder)."""
    cache_directory: Path | None = None
    """Where the latent and text caches go (default: the media folder, or the JSONL file's folder). Must differ between datasets."""
    caption_extension: str = ".txt"
    """Caption file extension: <stem><caption_extension>."""
    resolution: Resolution = Field(default_factory=lambda: [832, 480])
    """Target size (width x height, multiples of 16; of 32 for the TI2V-5B, whose buckets also step by 32): 960, "960x544", [960, 544], "480p" (832x480) or "720p" (1280x720; 1280x704 for the TI2V-5B)."""
    enable_bucket: bool = False
    """Group items into aspect-ratio buckets of about the target area instead of one fixed size."""
    bucket_no_upscale: bool = False
    """With enable_bucket: never upscale a smaller source; it keeps its own size (floored to 16; to 32 for the TI2V-5B)."""
    batch_size: int = Field(1, ge=1)
    """Items per batch and process (a batch never mixes buckets; global batch = batch_size x processes)."""
    num_repeats: int = Field(1, ge=1)
    """Each item appears this many times per epoch."""
    target_frames: list[int] = Field(default_factory=lambda: [1])
    """Video: window lengths to extract (each rounded down to 4n+1: the Wan VAEs pack 4 frames per latent frame after the first)."""
    frame_extraction: FrameExtraction = "head"
    """Video: head, middle, chunk, slide, uniform or full."""
    frame_stride: int = Field(1, ge=1)
    """Video, slide mode: frames between window starts."""
    frame_sample: int = Field(1, ge=1)
    """Video, uniform mode: number of evenly spaced windows per target length."""
    max_frames: int = Field(129, ge=1)
    """Video, full mode: longest window (rounded down to 4n+1)."""
    source_fps: float | None = Field(None, gt=0)
    """Video: frame rate of the source; frames are resampled to the model's rate (Wan's 16 fps; 24 fps for the TI2V-5B). Unset keeps every frame."""
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    """Probability of training an item with an empty caption (applied at train time)."""
    is_reg: bool = False
    """Regularisation data: its loss is weighted by prior_loss_weight."""
    mask_directory: Path | None = None
    """Folder of loss masks, one per item with the item's stem (grayscale, white = learn, black = ignore; the item's own pixel size). Videos: a mask video of the same frame count, or one mask image for all frames. Cached at latent resolution by cache-latents; used by [masked_training]."""
    mask_missing: Literal["skip", "unmasked"] = "skip"
    """With mask_directory: an item whose mask is missing, unreadable or of another size is "skip"ped (not trained) or trained "unmasked" (the whole frame counts)."""


class LatentCacheConfig(Section):
    device: str = "auto"
    """Device for the VAE: "auto" (cuda when present), "cuda", "cuda:1", "cpu"."""
    batch_size: int = Field(1, ge=1)
    """Items encoded together (same bucket only)."""
    num_workers: int = Field(2, ge=0)
    """Worker threads that decode media ahead of the VAE."""
    skip_existing: bool = True
    """Do not re-encode items whose cache file exists and holds latents of the expected shape (a cache of another shape, made at another resolution or window, is encoded again)."""
    keep_cache: bool = False
    """Keep latent caches the current media and settings no longer produce (removed media, media replaced by a file of another size, changed windows); otherwise they are deleted."""
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """VAE compute dtype; "auto" is bfloat16 on CUDA and float32 on CPU."""
    vae_cache_cpu: bool = False
    """Keep the VAE's causal-conv feature cache (frames carried between chunks) on the CPU: less VRAM, more transfers."""
    vae_tiling: bool = False
    """Encode / decode large frames in tiles (less VRAM)."""


class TextEncoderCacheConfig(Section):
    device: str = "auto"
    """Device for the text encoder: "auto" (cuda when present), "cuda", "cpu"."""
    batch_size: int = Field(16, ge=1)
    """Captions encoded together."""
    num_workers: int = Field(2, ge=0)
    """Worker threads that write the cache files while the encoder runs (0: write inline)."""
    skip_existing: bool = True
    """Do not re-encode captions whose cache file exists and was made from the same caption."""
    keep_cache: bool = False
    """Keep text caches whose media is gone (otherwise they are deleted)."""
    fp8_t5: bool = False
    """Store the text encoder's block Linear weights in fp8 with per-row scales, upcast at use (less memory). The encoder computes in bfloat16 on CUDA, float32 on CPU."""


class DatasetsConfig(Section):
    general: DatasetEntry = Field(default_factory=DatasetEntry)
    """[datasets.general]: defaults for every dataset."""
    train: list[DatasetEntry] = Field(default_factory=list)
    """[[datasets.train]]: training datasets."""
    val: list[DatasetEntry] = Field(default_factory=list)
    """[[datasets.val]]: validation datasets (never shuffled)."""
    latent_cache: LatentCacheConfig = Field(default_factory=LatentCacheConfig)
    """[datasets.latent_cache]: settings of cache-latents."""
    text_encoder_cache: TextEncoderCacheConfig = Field(default_factory=TextEncoderCacheConfig)
    """[datasets.text_encoder_cache]: settings of cache-text."""
