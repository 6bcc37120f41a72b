"""Match scanned media items to the latent and text cache files on disk.

An item is usable when its latent cache exists under the musubi-tuner name and holds latents of the shape the
current settings expect (read from the tensor name in the file header; the name alone does not identify the
resolution), and its caption's text cache exists. A cache of another shape, or only of another size / window,
is stale: never used, counted and reported with the command that re-encodes it. A cache file holding two
latents (or two text) tensors, as musubi-tuner leaves when it re-caches in another dtype over a file, is stale
too (``AmbiguousCacheError``). When nothing is usable the user is told which command to run. A latent cache made
by the other VAE (a Wan 2.1 VAE cache for a TI2V-5B run, or a Wan 2.2 VAE cache for any other model) is always a
``UserError`` naming the VAE to set and the command that re-encodes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..common.logger import get_logger
from ..errors import UserError
from ..models.wan.conditioning import cache_compatible
from ..models.wan.latent_space import BY_VAE_TYPE, latent_space
from .blueprint import DatasetSpec
from .cache_format import (
    LATENT_NAME,
    AmbiguousCacheError,
    cache_model_type,
    cache_vae_type,
    check_text_cache,
    read_latent_shape,
)
from .masks import mask_cache_state
from .sources import MediaItem, no_items_reason, scan_dataset

logger = get_logger(__name__)


@dataclass(frozen=True)
class CachedItem:
    """One usable training item: its two cache files and where it belongs."""

    key: str
    latent_path: Path
    text_path: Path
    latent_shape: tuple[int, int, int]
    """(F, H, W) of the cached latents, read from the tensor name; items batch only with equal shapes."""
    dataset_index: int
    loss_weight: float
    caption_dropout_rate: float
    extra_paths: tuple[tuple[str, Path | None], ...] = ()
    """(name, file) of every enhancement's per-item cache (``enhancements.base.ItemCache``); None: absent."""
    mask_path: Path | None = None
    """Its latent-resolution loss mask cache (datasets with ``mask_directory``), else None."""


@dataclass
class CacheReport:
    """How many items of one dataset could be used, and why the others could not."""

    name: str
    media_items: int = 0
    usable: int = 0
    missing_latents: list[str] = field(default_factory=list)
    stale_latents: list[str] = field(default_factory=list)
    """Items whose latent cache holds another shape (encoded at another resolution), or that have a cache only at
    another size or window (media or settings changed since caching)."""
    missing_text: list[str] = field(default_factory=list)
    stale_text: list[str] = field(default_factory=list)
    """Text cache file names holding several ``varlen_t5_*`` tensors (re-cached in another dtype over the file)."""
    unreadable: list[str] = field(default_factory=list)
    no_items: str | None = None
    """Why the media gave no item at all (``sources.no_items_reason``), or None."""
    wrong_type: list[tuple[str, str]] = field(default_factory=list)
    """(item key, the model type its cache was made for) of caches without the conditioning this run needs."""
    wrong_vae: list[tuple[str, str]] = field(default_factory=list)
    """(item key, the VAE type that made its cache) of caches of the other VAE than this run's model takes."""
    model_type: str = "t2v"
    missing_extra: dict[str, list[str]] = field(default_factory=dict)
    """Item keys without an enhancement's per-item cache file that the enhancement needs (or with a stale one), by
    cache suffix."""
    extra_commands: dict[str, str] = field(default_factory=dict)
    """The command that writes each of those files (``ItemCache.command``), by suffix."""
    missing_masks: list[str] = field(default_factory=list)
    """Items of a dataset with masks whose mask cache is missing (not cached yet, or its mask failed under "skip")."""
    stale_masks: list[str] = field(default_factory=list)
    """Items whose mask cache was made from another mask file or at another shape."""
    unmasked: int = 0
    """Items trained unmasked by ``mask_missing = "unmasked"``."""

    def summary(self) -> str:
        parts = [f"{self.usable} of {self.media_items} item(s) usable"]
        if self.missing_latents:
            parts.append(f"{len(self.missing_latents)} without latent cache (e.g. {self.missing_latents[0]})")
        if self.stale_latents:
            parts.append(f"{len(self.stale_latents)} with a stale latent cache made at another resolution or window "
                         f"(e.g. {self.stale_latents[0]}; re-run `wantrainer cache-latents`, which re-encodes stale "
                         "files even with skip_existing = true, or delete them)")
        if self.missing_text:
            parts.append(f"{len(self.missing_text)} without text cache (e.g. {self.missing_text[0]})")
        if self.stale_text:
            parts.append(f"{len(self.stale_text)} text cache file(s) holding several varlen_t5 tensors, re-cached in "
                         f"another dtype over the file (e.g. {self.stale_text[0]}; re-run `wantrainer cache-text` "
                         "with skip_existing = false, or with skip_existing = true, which re-encodes such files, "
                         "or delete them)")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} with an unreadable cache file")
        if self.missing_masks or self.stale_masks:
            example = (self.missing_masks or self.stale_masks)[0]
            parts.append(f"{len(self.missing_masks)} without mask cache and {len(self.stale_masks)} with a mask cache "
                         f"of an edited mask or another shape (e.g. {example}; run `wantrainer cache-latents`, which "
                         "caches the masks; an item whose mask cannot be read stays out under mask_missing = "
                         "\"skip\", `wantrainer doctor` lists them)")
        if self.unmasked:
            parts.append(f"{self.unmasked} trained unmasked (mask missing or bad, mask_missing = \"unmasked\")")
        if self.wrong_type:
            key, made_for = self.wrong_type[0]
            parts.append(f"{len(self.wrong_type)} with a latent cache made for a {made_for} model, without the "
                         f"conditioning the {self.model_type} model trains on (e.g. {key}; re-run `wantrainer "
                         "cache-latents --config <your config>` with this `dit`: it re-encodes them)")
        for suffix, keys in self.missing_extra.items():
            command = self.extra_commands.get(suffix)
            run = f"run `{command}`" if command else "run the caching command the feature's docs name"
            parts.append(f"{len(keys)} without a current {suffix} cache file (missing, or made with other settings; "
                         f"e.g. {keys[0]}; {run})")
        if self.wrong_vae:
            parts.append(self.wrong_vae_text())
        return f"{self.name}: " + ", ".join(parts)

    def wrong_vae_text(self) -> str:
        key, made_with = self.wrong_vae[0]
        made = BY_VAE_TYPE[made_with].label if made_with in BY_VAE_TYPE else made_with
        want = latent_space(self.model_type)
        return (f"{len(self.wrong_vae)} with a latent cache made by {made}, but the {self.model_type} model trains "
                f"on the latents of {want.label} (e.g. {key}; set `vae` to that file and re-run `wantrainer "
                "cache-latents --config <your config>`: it re-encodes them)")


def _cached_keys_by_stem(folder: Path) -> dict[str, set[str]]:
    """Item keys of the latent cache files in ``folder``, grouped by media stem."""
    found: dict[str, set[str]] = {}
    if folder.is_dir():
        for entry in folder.iterdir():
            match = LATENT_NAME.match(entry.name)
            if match:
                found.setdefault(match.group("stem"), set()).add(match.group("key"))
    return found


def _cached_elsewhere(item: MediaItem, keys_by_stem: dict[str, set[str]]) -> bool:
    """True when the folder holds a cache of ``item`` at another size or, for a video, of another window."""
    keys = keys_by_stem.get(item.source_stem, set())
    return bool(keys) if item.is_video else item.key in keys


def _text_usable(path: Path, known: dict[Path, bool], report: CacheReport) -> bool:
    """The text cache holds exactly one ``varlen_t5_*`` tensor (checked once per file; problems reported once)."""
    if path not in known:
        try:
            check_text_cache(path)
            known[path] = True
        except AmbiguousCacheError as exc:
            logger.warning("%s: %s (re-run `wantrainer cache-text`)", report.name, exc)
            report.stale_text.append(path.name)
            known[path] = False
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("%s: cannot read %s: %s", report.name, path, exc)
            report.unreadable.append(path.name)
            known[path] = False
    return known[path]


def _extra_paths(spec: DatasetSpec, latent: Path, text: Path, item_caches: Sequence[Any], key: str,
                 report: CacheReport) -> tuple[tuple[str, Path | None], ...] | None:  # fmt: skip
    """The item's enhancement cache files; None (reported) when one that must exist is missing. A cache whose
    ``datasets`` rule leaves ``spec`` out gives None without looking at the disk (a leftover file is not read)."""
    found: list[tuple[str, Path | None]] = []
    for cache in item_caches:
        if not cache.applies_to(spec):
            found.append((cache.name, None))
            continue
        path = cache.path_for(latent, text)
        if not path.is_file() or (cache.is_current is not None and not cache.is_current(path, latent)):
            if cache.missing == "skip":
                report.missing_extra.setdefault(cache.suffix, []).append(key)
                report.extra_commands.setdefault(cache.suffix, cache.command)
                return None
            found.append((cache.name, None))
        else:
            found.append((cache.name, path))
    return tuple(found)


def discover_cached_items(
    spec: DatasetSpec, prior_loss_weight: float = 1.0, dataset_index: int | None = None, model_type: str = "t2v",
    item_caches: Sequence[Any] = (),
) -> tuple[list[CachedItem], CacheReport]:
    """Scan ``spec``'s media and keep the items whose caches exist, hold the expected latent shape and the
    conditioning ``model_type`` trains on (``dataset_index`` defaults to spec.index); ``item_caches``: the
    enhancements' per-item cache files (``enhancements.base.ItemCache``), read into every batch."""
    scan = scan_dataset(spec)
    report = CacheReport(spec.name, media_items=len(scan.items), no_items=no_items_reason(spec, scan),
                         model_type=model_type, unmasked=sum(1 for i in scan.items if i.mask_problem is not None))
    mask_hashes: dict[Path, str] = {}
    keys_by_stem = _cached_keys_by_stem(spec.cache_directory)
    weight = prior_loss_weight if spec.is_reg else 1.0
    items: list[CachedItem] = []
    text_state: dict[Path, bool] = {}
    for item in scan.items:
        if not item.latent_cache_path.is_file():
            stale = _cached_elsewhere(item, keys_by_stem)
            (report.stale_latents if stale else report.missing_latents).append(item.key)
            if not item.text_cache_path.is_file():  # so one message names both commands to run
                report.missing_text.append(item.key)
            continue
        try:
            shape = read_latent_shape(item.latent_cache_path)
            made_for = cache_model_type(item.latent_cache_path)
            made_with = cache_vae_type(item.latent_cache_path)
        except AmbiguousCacheError as exc:
            logger.warning("%s: %s (stale; re-run `wantrainer cache-latents`)", spec.name, exc)
            report.stale_latents.append(item.key)
            continue
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("%s: cannot read %s: %s", spec.name, item.latent_cache_path, exc)
            report.unreadable.append(item.key)
            continue
        if made_with != latent_space(model_type).vae_type:
            report.wrong_vae.append((item.key, made_with))
            continue
        if shape != item.latent_shape:
            logger.debug("%s: %s holds latents %s, expected %s (stale)", spec.name, item.latent_cache_path.name,
                         "x".join(map(str, shape)), "x".join(map(str, item.latent_shape)))
            report.stale_latents.append(item.key)
            continue
        if not cache_compatible(made_for, model_type):
            report.wrong_type.append((item.key, made_for))
            continue
        if not item.text_cache_path.is_file():
            report.missing_text.append(item.key)
            continue
        if not _text_usable(item.text_cache_path, text_state, report):
            continue
        if item.mask_cache_path is not None:
            state = mask_cache_state(item, mask_hashes)
            if state != "current":
                (report.missing_masks if state == "missing" else report.stale_masks).append(item.key)
                continue
        extras = _extra_paths(spec, item.latent_cache_path, item.text_cache_path, item_caches, item.key, report)
        if extras is None:
            continue
        items.append(CachedItem(item.key, item.latent_cache_path, item.text_cache_path, shape,
                                spec.index if dataset_index is None else dataset_index,
                                weight, spec.caption_dropout_rate if spec.split == "train" else 0.0, extras,
                                item.mask_cache_path))
    report.usable = len(items)
    return items, report


def discover_all(specs: list[DatasetSpec], prior_loss_weight: float = 1.0, model_type: str = "t2v",
                 item_caches: Sequence[Any] = ()) -> tuple[list[CachedItem], list[CacheReport]]:  # fmt: skip
    """Usable items of every dataset (``dataset_index`` = position in ``specs``) for a ``model_type`` run; warns
    about the rest, ``UserError`` when nothing at all is usable."""
    if not specs:
        raise UserError("no datasets configured: add a [[datasets.train]] table with a media folder")
    items: list[CachedItem] = []
    reports: list[CacheReport] = []
    for position, spec in enumerate(specs):
        found, report = discover_cached_items(spec, prior_loss_weight, dataset_index=position, model_type=model_type,
                                              item_caches=item_caches)
        items.extend(found)
        reports.append(report)
        if report.wrong_vae:
            raise UserError(f"{report.name} ({spec.cache_directory}): {report.wrong_vae_text()}")
        if report.usable < report.media_items:
            logger.warning("%s", report.summary())
        else:
            logger.info("%s", report.summary())
    if not items:
        raise UserError(_nothing_usable_message(reports))
    return items, reports


def _nothing_usable_message(reports: list[CacheReport]) -> str:
    lines = ["no training item has both a latent cache and a text cache (and a mask cache where it has masks):"]
    lines += [f"  {r.summary()}" for r in reports]
    lines += [f"  {r.no_items}" for r in reports if r.no_items]
    if any(r.missing_latents or r.stale_latents or r.unreadable or r.wrong_type or r.missing_masks or r.stale_masks
           for r in reports):
        lines.append("run `wantrainer cache-latents --config <your config>` to encode the media")
    if any(r.missing_text for r in reports):
        lines.append("run `wantrainer cache-text --config <your config>` to encode the captions")
    if any(r.missing_extra for r in reports):
        lines.append("the enabled features need more cache files per item: see the docs of the feature named above")
    if any(r.stale_text for r in reports):
        lines.append("run `wantrainer cache-text --config <your config>` with skip_existing = false to encode the "
                     "captions again")
    return "\n".join(lines)
