"""What both caching commands share: datasets to cache, device / dtype choice, prefetching, orphans, the summary."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from ..common.logger import get_logger
from ..config.datasets import DatasetsConfig
from ..dataset.blueprint import DatasetSpec, resolve_datasets
from ..dataset.cache_format import LATENT_NAME, TEXT_SUFFIX
from ..dataset.sources import MediaItem, no_items_reason, scan_dataset
from ..dataset.windows import source_key
from ..errors import UserError

logger = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

LATENT_FILE = LATENT_NAME
TEXT_FILE = re.compile(r"^(?P<stem>.+)" + re.escape(TEXT_SUFFIX) + "$")


class Progress(Protocol):
    """A progress display the command layer hands to the library functions."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, count: int = 1) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class CacheSummary:
    """Outcome of one caching run."""

    kind: str
    """"latent" or "text"."""
    cached: int = 0
    skipped: int = 0
    """Items whose cache file already existed (skip_existing)."""
    stale: int = 0
    """Of ``cached``: existing latent caches holding another shape (made at another resolution or window) that
    were encoded again."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """(file, reason) for media that could not be read or encoded; nothing was written for them."""
    non_finite: list[str] = field(default_factory=list)
    """Keys whose encoding held NaN / Inf; reported (also in ``failed``) and not written."""
    removed: list[Path] = field(default_factory=list)
    """Orphan cache files deleted (keep_cache = false)."""
    orphans_kept: list[Path] = field(default_factory=list)
    """Orphan cache files left in place (keep_cache = true)."""
    seconds: float = 0.0
    unusable: list[str] = field(default_factory=list)
    """Datasets left without a single cached item (the command then exits 2)."""
    has_masks: bool = False
    """Some dataset has a ``mask_directory`` (latent runs cache masks too)."""
    masks_cached: int = 0
    masks_skipped: int = 0
    unmasked: list[tuple[Path, str]] = field(default_factory=list)
    """(media or mask file, reason) of items trained unmasked (``mask_missing = "unmasked"``)."""
    extras: dict[str, dict[str, int]] = field(default_factory=dict)
    """The enhancements' pixel caches (``caching.cache_pixel_features``): name -> cached / skipped / stale counts."""

    def lines(self) -> list[str]:
        rate = f", {self.cached / self.seconds:.2f} items/s" if self.cached and self.seconds > 0 else ""
        stale = f" ({self.stale} re-encoded (stale))" if self.stale else ""
        out = [f"{self.kind} caches: {self.cached} cached{stale}, {self.skipped} skipped (existing), "
               f"{len(self.failed)} failed in {self.seconds:.1f}s{rate}"]
        if self.has_masks:
            out.append(f"mask caches: {self.masks_cached} cached, {self.masks_skipped} skipped (existing)")
        for name, counts in self.extras.items():
            stale = f" ({counts['stale']} re-encoded (stale))" if counts["stale"] else ""
            out.append(f"{name} caches: {counts['cached']} cached{stale}, {counts['skipped']} skipped (existing)")
        out += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        out += [f"  unmasked: {path}: {reason} (mask_missing = \"unmasked\": trained on the whole frame)"
                for path, reason in self.unmasked]
        if self.removed:
            out.append(f"  removed {len(self.removed)} orphan cache file(s) of media that is gone or changed")
        if self.orphans_kept:
            out.append(f"  kept {len(self.orphans_kept)} orphan cache file(s) (keep_cache = true)")
        out += [f"  no usable item: {reason}" for reason in self.unusable]
        return out


def dataset_specs(datasets: DatasetsConfig, model_type: str = "t2v") -> list[DatasetSpec]:
    """Every train and val dataset (both are cached), resolved for a ``model_type`` DiT."""
    specs = resolve_datasets(datasets, "train", model_type) + resolve_datasets(datasets, "val", model_type)
    if not specs:
        raise UserError("no datasets configured: add a [[datasets.train]] table with a media folder")
    return specs


@dataclass
class CacheRun:
    """One caching run once started: its summary, device, the scanned media and the cache files they own."""

    summary: CacheSummary
    device: torch.device
    items: list[MediaItem]
    expected: dict[Path, set[str]]
    """Cache folder -> the file names the current media and settings produce (see ``clean_orphans``)."""
    protected: dict[Path, set[str]]
    """Cache folder -> stems of media that exists but could not be read this time (their caches are kept)."""
    started: float
    datasets: list[tuple[str, str | None, list[Path]]] = field(default_factory=list)
    """(dataset name, why it gave no item or None, the cache files of its items) for the final check."""
    mask_rules: dict[Path, str] = field(default_factory=dict)
    """Cache folder -> ``mask_missing`` of the datasets with masks."""
    train_caches: set[Path] = field(default_factory=set)
    """Latent cache paths of the train datasets' items (the rest are validation items only)."""


def start_run(kind: str, datasets: DatasetsConfig, device: str, device_key: str,
              cache_path: Callable[[MediaItem], Path], model_type: str = "t2v") -> CacheRun:
    """Check the device (even when everything turns out to be cached), then scan every train / val dataset.

    Skipped media goes to ``summary.failed``; ``cache_path`` names an item's cache file of this kind; ``model_type``
    decides the buckets and latent grid (TI2V-5B: the Wan 2.2 VAE's).
    """
    started = time.perf_counter()
    run = CacheRun(CacheSummary(kind), resolve_device(device, device_key), [], {}, {}, started)
    for spec in dataset_specs(datasets, model_type):
        scan = scan_dataset(spec)
        run.summary.failed += [(s.path, s.reason) for s in scan.skipped]
        if spec.mask_directory is not None:
            run.summary.has_masks = kind == "latent"
            run.mask_rules[spec.cache_directory] = spec.mask_missing
            if kind == "latent":
                run.summary.unmasked += [(s.path, s.reason) for s in scan.unmasked]
        run.protected.setdefault(spec.cache_directory, set()).update(media_stem(s.path) for s in scan.skipped)
        run.expected.setdefault(spec.cache_directory, set()).update(cache_path(i).name for i in scan.items)
        run.items += scan.items
        if spec.split == "train":
            run.train_caches.update(i.latent_cache_path for i in scan.items)
        run.datasets.append((spec.name, no_items_reason(spec, scan), [cache_path(i) for i in scan.items]))
    return run


def encode_todo(todo: list[T], load_model: Callable[[], R], encode: Callable[[R], None], progress: Progress,
                description: str) -> None:
    """Load the model only when there is work, then run ``encode(model)`` inside a started progress display."""
    if not todo:
        return
    model = load_model()
    progress.start(len(todo), description)
    encode(model)
    progress.close()


def finish(run: CacheRun, pattern: re.Pattern, keep_cache: bool) -> CacheSummary:
    """Clean (or list) the orphan caches and stamp the run time."""
    clean_orphans(run.expected, run.protected, pattern, keep_cache, run.summary)
    for name, reason, caches in run.datasets:
        if not any(path.is_file() for path in caches):
            run.summary.unusable.append(reason or f"`{name}`: none of its {len(caches)} item(s) could be cached "
                                                  "(see the failures above)")
    run.summary.seconds = time.perf_counter() - run.started
    return run.summary


def resolve_device(spec: str, key: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an unavailable or malformed device is a user error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"`{key}` = {spec!r} is not a device: use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"`{key}` = {spec!r} but no CUDA device is available; use \"auto\" or \"cpu\"")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 elsewhere (bfloat16 matmuls are very slow on CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def require_file(path: Path | None, key: str, what: str) -> Path:
    if path is None:
        raise UserError(f"`{key}` is not set: point it at the {what}")
    if not Path(path).is_file():
        raise UserError(f"`{key}`: {what} not found: {path}")
    return Path(path)


def media_stem(path: Path) -> str:
    """The cache stem of a media file or frame folder (as the dataset scan names it)."""
    return path.name if path.is_dir() else path.stem


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def source_groups(items: list[MediaItem]) -> list[list[MediaItem]]:
    """Items grouped by source file in first-seen order: all the windows of a video are decoded in one pass."""
    groups: dict[tuple, list[MediaItem]] = {}
    for item in items:
        groups.setdefault(source_key(item), []).append(item)
    return list(groups.values())


def per_source(read: Callable[[list[MediaItem]], Iterable[tuple[MediaItem, R]]]
               ) -> Callable[[list[MediaItem]], Iterator[tuple[MediaItem, R | Exception]]]:
    """``read`` for one source's items, made safe: an unexpected failure is reported as the result of every item
    not yet returned (one bad file never stops the run)."""

    def produce(items: list[MediaItem]) -> Iterator[tuple[MediaItem, R | Exception]]:
        done: set[str] = set()
        try:
            for item, result in read(items):
                done.add(item.key)
                yield item, result
        except Exception as exc:
            for item in items:
                if item.key not in done:
                    yield item, exc

    return produce


def stream_prefetch(sources: Sequence[T], produce: Callable[[T], Iterable[R]], workers: int, depth: int = 4
                    ) -> Iterator[R]:
    """Everything ``produce(source)`` yields, source after source, in order; ``workers`` threads run the producers
    of the next sources ahead, each holding at most ``depth`` results (0 workers: inline).

    ``produce`` should report per-item failures as results; an exception it raises stops the iteration.
    """
    if workers <= 0:
        for source in sources:
            yield from produce(source)
        return
    stop = threading.Event()

    def put(channel: queue.Queue, message: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                channel.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run(source: T, channel: queue.Queue) -> None:
        try:
            for result in produce(source):
                if not put(channel, ("result", result)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(channel, ("error", exc))
            return
        put(channel, ("end", None))

    channels: deque[queue.Queue] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-loader")

    def submit(index: int) -> None:
        if index < len(sources):
            channel: queue.Queue = queue.Queue(maxsize=depth)
            pool.submit(run, sources[index], channel)
            channels.append(channel)

    try:
        for index in range(workers + 1):
            submit(index)
        next_index = workers + 1
        while channels:
            kind, value = channels[0].get()
            if kind == "result":
                yield value
                continue
            if kind == "error":
                raise value
            channels.popleft()
            submit(next_index)
            next_index += 1
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def clean_orphans(
    expected: dict[Path, set[str]], protected_stems: dict[Path, set[str]], pattern: re.Pattern, keep: bool,
    summary: CacheSummary,
) -> None:
    """Delete (or with ``keep`` only list) cache files named like ours that no current item produces.

    ``expected`` maps each cache folder to the file names the current media and settings produce; files of
    ``protected_stems`` (media that exists but could not be read this time) are left alone. Only files matching
    ``pattern`` are considered, so other files in a shared media / cache folder are never touched.
    """
    for folder, names in expected.items():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            match = pattern.match(entry.name)
            if not match or entry.name in names or not entry.is_file():
                continue
            if match.group("stem") in protected_stems.get(folder, set()):
                continue
            if keep:
                summary.orphans_kept.append(entry)
            else:
                entry.unlink()
                summary.removed.append(entry)
                logger.info("removed orphan cache %s", entry)
