"""``wantrainer cache-latents``: encode every train / val item with the Wan VAE into ``*_wan.safetensors`` caches.

Items are grouped by bucket and window length so a batch never mixes shapes; each video is decoded once for all
its windows (``dataset.windows``), and ``num_workers`` threads decode the next files ahead of the VAE. With ``skip_existing`` an existing cache is kept only when the latent shape in its header is the
one the current settings expect; a cache of another shape (the musubi-tuner name carries the source size, not the
resolution) is stale and encoded again. A file that cannot be read is listed in the summary and the run goes on;
latents with NaN / Inf are reported and not written.

For an image-to-video DiT (`dit` is read for its model type) each cache also holds the conditioning that model
trains on (``caching.conditioning``); a cache made for a model type with other conditioning is stale. The model type
also picks the VAE (``models.wan.latent_space``): the TI2V-5B caches the Wan 2.2 VAE's 48-channel latents at 16x
(buckets in multiples of 32 px), every other model the Wan 2.1 VAE's; `vae` must be that VAE, and a cache made by
the other VAE is stale (re-encoded). Each cache records ``model_type`` and ``vae_type``.

Datasets with ``mask_directory`` also get their loss masks cached at latent resolution (``caching.cache_masks``),
first, since that needs no model; an item whose mask fails under ``mask_missing = "skip"`` is not encoded. The
active enhancements' per-item pixel files (REPA's encoder features) follow the latents
(``caching.cache_pixel_features``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from ..common.logger import get_logger
from ..config.datasets import LatentCacheConfig
from ..dataset.cache_format import (
    AmbiguousCacheError,
    cache_model_type,
    cache_vae_type,
    read_latent_shape,
    save_latent_cache,
)
from ..dataset.sources import MediaItem
from ..dataset.windows import window_pixels
from ..errors import UserError
from ..models.wan.conditioning import cache_compatible, require_clip_path, run_model_type
from ..models.wan.latent_space import latent_space
from .cache_masks import cache_masks
from .cache_pixel_features import cache_pixel_features
from .common import (
    LATENT_FILE,
    CacheSummary,
    NoProgress,
    Progress,
    compute_dtype,
    encode_todo,
    finish,
    is_finite,
    per_source,
    require_file,
    source_groups,
    start_run,
    stream_prefetch,
)

logger = get_logger(__name__)


def load_vae(vae_path: Path, settings: LatentCacheConfig, device: torch.device, model_type: str = "t2v"):
    """The VAE of ``model_type``'s latent space; a ``UserError`` naming `vae` when the file is the other one."""
    from ..models.wan.vae import WanVAE

    vae = WanVAE.load(vae_path, device=device, dtype=compute_dtype(settings.vae_dtype, device),
                      cache_cpu=settings.vae_cache_cpu, tiling=settings.vae_tiling)
    space = latent_space(model_type)
    if vae.latent_channels != space.channels:
        raise UserError(f"`vae` = {vae_path} has {vae.latent_channels} latent channels, but the {model_type} DiT "
                        f"(`dit`) trains on the latents of {space.label}: set `vae` to that file")
    return vae


def _loaded_batches(items: list[MediaItem], batch_size: int, workers: int, summary: CacheSummary,
                    progress: Progress) -> Iterator[tuple[list[MediaItem], torch.Tensor]]:
    """(items, pixels [B, 3, F, H, W]) batches of one (bucket, frames) each; unreadable items are recorded in
    ``summary`` and dropped. Each source file is decoded once (``workers`` threads decode the next ones ahead),
    and a batch goes out as soon as it is full, so memory holds at most a batch per shape."""
    pending: dict[tuple, tuple[list[MediaItem], list[torch.Tensor]]] = {}
    for item, result in stream_prefetch(source_groups(items), per_source(window_pixels), workers):
        if isinstance(result, Exception):
            summary.failed.append((item.path, f"{item.key}: {result}"))
            logger.warning("cannot read %s: %s", item.path, result)
            progress.advance(1)
            continue
        shape = (item.bucket, item.frames)
        good, pixels = pending.setdefault(shape, ([], []))
        good.append(item)
        pixels.append(result)
        if len(good) == batch_size:
            del pending[shape]
            yield good, torch.stack(pixels)
    for good, pixels in pending.values():
        yield good, torch.stack(pixels)


def _existing_state(item: MediaItem, model_type: str) -> str:
    """"missing", "current" (holds the expected latent shape and the conditioning ``model_type`` takes), "stale"
    (another shape, several latents tensors, or made for a model type with other conditioning) or "unreadable"."""
    if not item.latent_cache_path.is_file():
        return "missing"
    try:
        shape = read_latent_shape(item.latent_cache_path)
        compatible = (cache_compatible(cache_model_type(item.latent_cache_path), model_type)
                      and cache_vae_type(item.latent_cache_path) == latent_space(model_type).vae_type)
    except AmbiguousCacheError:  # two latents tensors (re-cached in another dtype over the file)
        return "stale"
    except Exception:  # truncated or foreign file: encode it again
        return "unreadable"
    return "current" if shape == item.latent_shape and compatible else "stale"


def _write(items: list[MediaItem], latents: torch.Tensor, extras: list[dict] | None, model_type: str,
           stale: set[Path], summary: CacheSummary) -> None:
    for index, (item, item_latents) in enumerate(zip(items, latents)):
        extra = extras[index] if extras is not None else {}
        if not all(is_finite(t) for t in (item_latents, *extra.values())):
            summary.non_finite.append(item.key)
            summary.failed.append((item.path, f"{item.key}: latents contain NaN / Inf (not written)"))
            logger.warning("%s: latents contain NaN / Inf; not written", item.key)
            continue
        save_latent_cache(item.latent_cache_path, item_latents, *item.cache_size, item.frames,
                          model_type=model_type, vae_type=latent_space(model_type).vae_type, **extra)
        summary.cached += 1
        if item.latent_cache_path in stale:
            summary.stale += 1
            logger.info("%s: re-encoded a stale cache (another resolution or window)", item.latent_cache_path.name)


def cache_latents(cfg, progress: Progress | None = None) -> CacheSummary:
    """Encode the latents of every train / val dataset of ``cfg`` (a ``WanTrainerConfig``)."""
    settings = cfg.datasets.latent_cache
    progress = progress or NoProgress()
    model_type = run_model_type(cfg.model)
    job = start_run("latent", cfg.datasets, settings.device, "datasets.latent_cache.device",
                    lambda item: item.latent_cache_path, model_type)
    summary = job.summary
    todo: list[MediaItem] = []
    stale: set[Path] = set()
    clip_path = require_clip_path(cfg.model, model_type)
    masks = cache_masks(job, settings.skip_existing, settings.keep_cache, settings.num_workers)
    for item in (i for i in job.items if i.latent_cache_path not in masks.dropped):
        state = _existing_state(item, model_type)
        if state == "stale":
            stale.add(item.latent_cache_path)
        if settings.skip_existing and state == "current":
            summary.skipped += 1
        else:
            todo.append(item)

    def load():
        what = "Wan 2.2 VAE file" if model_type == "ti2v" else "Wan 2.1 VAE file"
        vae = load_vae(require_file(cfg.model.vae, "vae", what), settings, job.device, model_type)
        from .conditioning import ImageConditioner

        dtype = compute_dtype(settings.vae_dtype, job.device)
        return vae, ImageConditioner.load(model_type, vae, clip_path, job.device, dtype)

    def encode(models) -> None:
        vae, conditioner = models
        for items, pixels in _loaded_batches(todo, settings.batch_size, settings.num_workers, summary, progress):
            latents = vae.encode(pixels)
            extras = conditioner.encode(pixels, latents) if conditioner is not None else None
            _write(items, latents, extras, model_type, stale, summary)
            progress.advance(len(items))

    encode_todo(todo, load, encode, progress, "cache-latents")
    cache_pixel_features(cfg, job, progress, masks.dropped)
    return finish(job, LATENT_FILE, settings.keep_cache)

def run(args: argparse.Namespace) -> int:
    from .cli_support import run_caching

    return run_caching(args, cache_latents, "cache-latents")
