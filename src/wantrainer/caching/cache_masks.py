"""The mask part of ``cache-latents``: each item of a dataset with ``mask_directory`` gets its latent-resolution
mask cached beside its latent cache (``*_wan_wtmask.safetensors``, see ``dataset.cache_format`` and
``dataset.masks``). No model is needed, so masks are cached even when every latent cache is current.

A mask cache is current when it holds the item's latent shape and was made from the same mask file (name and
SHA-256 of its bytes); with ``skip_existing`` current ones are kept. A mask that cannot be decoded follows the
dataset's ``mask_missing`` rule: "skip" lists the item as failed (its latents are not encoded and any old mask
cache is removed, so it does not train), "unmasked" writes a mask of ones that records why. Items whose mask was
missing or mis-sized at the scan get the same treatment (the scan already skipped them under "skip").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.logger import get_logger
from ..dataset.cache_format import MASK_NAME, save_mask_cache
from ..dataset.masks import latent_masks, mask_cache_state, mask_signature, rule_text
from ..dataset.sources import MediaItem
from .common import CacheRun, clean_orphans, per_source, source_groups, stream_prefetch

logger = get_logger(__name__)


@dataclass
class MaskOutcome:
    """What the mask pass did; ``dropped``: items not to encode (their mask failed under "skip")."""

    cached: int = 0
    skipped: int = 0
    dropped: set[Path] = field(default_factory=set)
    """Latent cache paths of the items whose mask failed under "skip"."""


def _write(item: MediaItem, mask: torch.Tensor, hashes: dict[Path, str], unmasked: str | None = None) -> None:
    assert item.mask_cache_path is not None
    source, sha = mask_signature(item, hashes)
    save_mask_cache(item.mask_cache_path, mask, *item.cache_size, source=source, sha256=sha, unmasked=unmasked)


def _ones(item: MediaItem) -> torch.Tensor:
    return torch.ones(item.latent_shape)


def cache_masks(run: CacheRun, skip_existing: bool, keep_cache: bool, workers: int) -> MaskOutcome:
    """Write the mask caches of ``run``'s items and clean the mask caches no current item produces. Problems go to
    ``run.summary``."""
    outcome = MaskOutcome()
    summary = run.summary
    hashes: dict[Path, str] = {}
    todo: list[MediaItem] = []
    for item in (i for i in run.items if i.mask_cache_path is not None):
        if skip_existing and mask_cache_state(item, hashes) == "current":
            outcome.skipped += 1
        elif item.mask_path is None:  # the scan found no usable mask; the rule is "unmasked"
            _write(item, _ones(item), hashes, unmasked=item.mask_problem)
            outcome.cached += 1
        else:
            todo.append(item)
    for item, result in stream_prefetch(source_groups(todo), per_source(latent_masks), workers):
        if not isinstance(result, Exception):
            _write(item, result, hashes)
            outcome.cached += 1
            continue
        rule = run.mask_rules.get(item.latent_cache_path.parent, "skip")
        logger.warning("%s: %s (%s)", item.key, result, rule_text(rule))
        if rule == "skip":
            summary.failed.append((item.mask_path, f"{item.key}: {result} ({rule_text(rule)})"))
            outcome.dropped.add(item.latent_cache_path)
            if item.mask_cache_path is not None:
                item.mask_cache_path.unlink(missing_ok=True)
        else:
            summary.unmasked.append((item.mask_path, f"{item.key}: {result}"))
            _write(item, _ones(item), hashes, unmasked=str(result))
            outcome.cached += 1
    expected = {folder: {i.mask_cache_path.name for i in run.items if i.mask_cache_path is not None
                         and i.mask_cache_path.parent == folder and i.latent_cache_path not in outcome.dropped}
                for folder in run.expected}
    clean_orphans(expected, run.protected, MASK_NAME, keep_cache, summary)
    summary.masks_cached, summary.masks_skipped = outcome.cached, outcome.skipped
    return outcome
