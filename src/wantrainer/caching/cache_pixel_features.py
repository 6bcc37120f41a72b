"""The enhancements' part of ``cache-latents``: per-item files computed from the clean pixels (``PixelCache``).

Every active enhancement's ``pixel_caches()`` (e.g. REPA's encoder features) gets one file per item beside the
item's latent cache, ``{latent cache stem}{suffix}.safetensors``. This pass runs after the latents: it decodes the
media again only for the items whose file is missing or stale (another encoder, input size or latent shape), loads
each encoder only when some item needs it, and cleans the files of items that are gone (unless ``keep_cache``).
Items whose latents could not be cached get no file, nor do validation items (validation measures the flow loss
alone, so their features would never be read).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..common.logger import get_logger
from ..dataset.cache_format import LATENT_NAME, LATENT_SUFFIX
from ..dataset.sources import MediaItem
from ..utils.atomic import save_safetensors_atomic
from .common import CacheRun, Progress, clean_orphans, encode_todo, is_finite

logger = get_logger(__name__)


def active_pixel_caches(cfg: Any) -> list[Any]:
    """The ``PixelCache``s of the enhancements this config turns on."""
    from ..enhancements.registry import build_enhancements

    return [cache for enh in build_enhancements(cfg) for cache in enh.pixel_caches()]


def _file_pattern(suffix: str) -> re.Pattern:
    """File names of ``suffix``'s cache (the latent cache name with ``{suffix}`` before ``.safetensors``)."""
    ours = LATENT_SUFFIX.replace(".safetensors", f"{suffix}.safetensors")
    return re.compile(LATENT_NAME.pattern.replace(re.escape(LATENT_SUFFIX), re.escape(ours)))


def cache_pixel_features(cfg: Any, job: CacheRun, progress: Progress, dropped: set[Path] = frozenset()) -> None:
    """Write the pixel caches of ``job``'s items (counts in ``job.summary.extras``)."""
    from .cache_latents import _loaded_batches

    settings = cfg.datasets.latent_cache
    for cache in active_pixel_caches(cfg):
        counts = job.summary.extras.setdefault(cache.name, {"cached": 0, "skipped": 0, "stale": 0})
        todo: list[MediaItem] = []
        stale: set[Path] = set()
        for item in job.items:
            if item.latent_cache_path in dropped or not item.latent_cache_path.is_file():
                continue  # its latents could not be cached: nothing to align with
            if item.latent_cache_path not in job.train_caches:
                continue  # a validation item: the validation loss is the flow loss alone
            state = cache.state(cache.path_for(item.latent_cache_path), item.latent_shape)
            if state == "stale":
                stale.add(item.latent_cache_path)
            if settings.skip_existing and state == "current":
                counts["skipped"] += 1
            else:
                todo.append(item)

        def encode(encoder, cache=cache, todo=todo, stale=stale, counts=counts) -> None:
            for items, pixels in _loaded_batches(todo, settings.batch_size, settings.num_workers, job.summary,
                                                 progress):
                with torch.no_grad():
                    features = encoder(pixels)
                for item, tensor in zip(items, features):
                    if not is_finite(tensor):
                        job.summary.failed.append((item.path, f"{item.key}: {cache.name} features contain NaN / Inf "
                                                              "(not written)"))
                        continue
                    save_safetensors_atomic({cache.tensor: tensor.detach().cpu().contiguous()},
                                            cache.path_for(item.latent_cache_path),
                                            metadata=cache.metadata(item.latent_shape))
                    counts["cached"] += 1
                    counts["stale"] += item.latent_cache_path in stale
                progress.advance(len(items))

        encode_todo(todo, lambda cache=cache: cache.load(job.device), encode, progress,
                    f"cache-latents ({cache.name})")
        expected = {folder: {cache.path_for(Path(folder) / name).name for name in names}
                    for folder, names in job.expected.items()}
        clean_orphans(expected, job.protected, _file_pattern(cache.suffix), settings.keep_cache, job.summary)
