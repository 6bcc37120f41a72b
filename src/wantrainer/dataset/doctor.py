"""``wantrainer doctor --config X``: what the datasets hold, what is wrong with them, and the buckets.

Per dataset: items found, captions missing, unreadable files, videos too short for each target length,
cache files present, videos whose frame rate is not 16 fps while ``source_fps`` is unset, and the bucket and
frame-count histograms as text and as a PNG (``{output_dir}/doctor_{split}_{index}.png``), plus a contact sheet
of a few items per bucket as the model sees them (``doctor_{split}_{index}_sheet.png``). A dataset with
``mask_directory`` also gets its masks checked (missing, unreadable, of another size or frame count: each listed
with the ``mask_missing`` rule that applies) and a sheet of the masks over the frames as the loss sees them
(``doctor_{split}_{index}_masks.png``). Exit 0 when training can proceed, 2 when not. No models.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..common.logger import get_logger
from ..errors import UserError
from ..utils.atomic import atomic_path
from .blueprint import DatasetSpec, resolve_datasets
from .cache_format import read_latent_shape
from .contact_sheet import (
    fps_warning,
    item_frames,
    masked_item_frames,
    off_rate_videos,
    sheet_items,
    write_contact_sheet,
)
from .masks import mask_cache_state, rule_text
from .sources import DatasetScan, MediaItem, scan_dataset

logger = get_logger(__name__)
_BAR = 40


@dataclass
class DatasetDiagnosis:
    spec: DatasetSpec
    scan: DatasetScan | None = None
    error: str | None = None
    buckets: Counter = field(default_factory=Counter)
    frame_lengths: Counter = field(default_factory=Counter)
    too_short: dict[int, list[tuple[Path, int]]] = field(default_factory=dict)
    latent_caches: int = 0
    text_caches: int = 0
    plot: Path | None = None
    sheet: Path | None = None
    mask_sheet: Path | None = None
    mask_caches: int = 0
    fps_off: list[tuple[Path, float]] = field(default_factory=list)


def diagnose(spec: DatasetSpec) -> DatasetDiagnosis:
    """Scan one dataset and collect what the report shows."""
    found = DatasetDiagnosis(spec)
    try:
        found.scan = scan = scan_dataset(spec, decode_images=True)
    except UserError as exc:
        found.error = str(exc)
        return found
    for item in scan.items:
        found.buckets[item.bucket] += 1
        if item.frames is not None:
            found.frame_lengths[item.frames] += 1
    if spec.is_video and spec.frame_extraction != "full":
        for target in spec.target_frames:
            short = [(path, count) for path, count in scan.frame_counts.items() if count < target]
            if short:
                found.too_short[target] = short
    if spec.is_video and spec.source_fps is None:
        found.fps_off = off_rate_videos([item.path for item in scan.items], model_fps=spec.model_fps)
    found.latent_caches = sum(_current_latents(item) for item in scan.items)
    found.text_caches = len({item.text_cache_path for item in scan.items if item.text_cache_path.is_file()})
    if spec.mask_directory is not None:
        hashes: dict[Path, str] = {}
        found.mask_caches = sum(mask_cache_state(item, hashes) == "current" for item in scan.items)
    return found


def _current_latents(item: MediaItem) -> bool:
    """The item's latent cache exists and holds the shape the current settings expect (not stale)."""
    if not item.latent_cache_path.is_file():
        return False
    try:
        return read_latent_shape(item.latent_cache_path) == item.latent_shape
    except Exception:  # unreadable: not usable
        return False


def _mask_lines(d: DatasetDiagnosis) -> list[str]:
    spec, scan = d.spec, d.scan
    if spec.mask_directory is None or scan is None:
        return []
    masked = sum(1 for item in scan.items if item.mask_path is not None)
    skipped = sum(1 for s in scan.skipped if "mask_missing" in s.reason)
    lines = [f"  masks ({spec.mask_directory}, mask_missing = \"{spec.mask_missing}\"): {masked} of "
             f"{len(scan.items)} item(s) masked, {len(scan.unmasked)} file(s) trained unmasked, {skipped} skipped "
             f"for their mask; mask caches present: {d.mask_caches} of {len(scan.items)}"]
    if scan.unmasked:
        lines.append(f"  masks missing or bad ({rule_text('unmasked')}):")
        lines += [f"    {s.path}: {s.reason}" for s in scan.unmasked]
    return lines


def _histogram(counter: Counter, label) -> list[str]:
    if not counter:
        return ["    (none)"]
    peak = max(counter.values())
    return [f"    {label(key):>10}  {'#' * max(1, round(_BAR * n / peak)):<{_BAR}} {n}" for key, n in sorted(counter.items())]


def format_diagnosis(d: DatasetDiagnosis) -> str:
    """The text report of one dataset."""
    spec = d.spec
    kind = "videos" if spec.is_video else "images"
    lines = [f"{spec.name}: {kind} from {spec.source} (cache: {spec.cache_directory})"]
    if d.error is not None or d.scan is None:
        return "\n".join(lines + [f"  ERROR: {d.error}"])
    scan = d.scan
    sources = len({item.path for item in scan.items})
    lines.append(f"  items: {len(scan.items)} from {sources} file(s); unreadable or skipped: {len(scan.skipped)}; "
                 f"captions missing: {len(scan.missing_captions)}")
    lines.append(f"  caches present: {d.latent_caches} of {len(scan.items)} latent, "
                 f"{d.text_caches} of {sources} text")
    if scan.skipped:
        lines.append("  skipped files:")
        lines += [f"    {s.path}: {s.reason}" for s in scan.skipped]
    if scan.missing_captions:
        lines.append(f"  captions missing (an empty caption is used; add <name>{spec.caption_extension}):")
        lines += [f"    {p}" for p in scan.missing_captions]
    lines += _mask_lines(d)
    if d.fps_off:
        lines.append(f"  WARNING: {fps_warning(spec.name, d.fps_off, d.spec.model_fps)}")
    for target, short in sorted(d.too_short.items()):
        lines.append(f"  too short for {target} frames ({len(short)} video(s)):")
        lines += [f"    {path.name}: {count} frames" for path, count in short]
    lines.append("  buckets (width x height: items):")
    lines += _histogram(d.buckets, lambda b: f"{b[0]}x{b[1]}")
    if spec.is_video:
        lines.append("  frame counts (window length: items):")
        lines += _histogram(d.frame_lengths, str)
    return "\n".join(lines)


def write_plot(d: DatasetDiagnosis, path: Path) -> None:
    """Bucket and frame-count histograms of one dataset as a PNG (atomic write)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    panels = [("buckets (W x H)", d.buckets, lambda b: f"{b[0]}x{b[1]}")]
    if d.spec.is_video:
        panels.append(("window length (frames)", d.frame_lengths, str))
    figure = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    for axes, (title, counter, label) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        keys = sorted(counter)
        axes.bar([label(k) for k in keys], [counter[k] for k in keys], color="#4c72b0")
        axes.set_title(title)
        axes.set_ylabel("items")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.tick_params(axis="x", labelrotation=45)
    figure.suptitle(f"{d.spec.name}: {sum(d.buckets.values())} items")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


def _blockers(train: list[DatasetDiagnosis], val: list[DatasetDiagnosis]) -> list[str]:
    problems = [d.error if d.spec.name in d.error else f"{d.spec.name}: {d.error}" for d in train + val if d.error]
    if not train:
        problems.append("no [[datasets.train]] entry")
    elif not any(d.scan and d.scan.items for d in train):
        problems.append("no training dataset holds a usable item")
    return problems


def run(args: argparse.Namespace) -> int:
    """Print the report, write the plots; 0 when training can proceed, 2 when not."""
    from ..config_parser import load_config_for_command

    cfg = load_config_for_command(args)
    output_dir = Path(cfg.saving.output_dir)
    results: dict[str, list[DatasetDiagnosis]] = {}
    out = sys.stdout
    from ..models.wan.conditioning import run_model_type

    model_type = run_model_type(cfg.model)  # TI2V-5B: the Wan 2.2 VAE's buckets and latent grid
    for split in ("train", "val"):
        results[split] = []
        for spec in resolve_datasets(cfg.datasets, split, model_type):
            d = diagnose(spec)
            if d.scan is not None:
                d.plot = output_dir / f"doctor_{split}_{spec.index}.png"
                write_plot(d, d.plot)
            if d.scan is not None and d.scan.items:
                d.sheet = output_dir / f"doctor_{split}_{spec.index}_sheet.png"
                rows = item_frames(sheet_items(d.scan.items))
                write_contact_sheet(f"{spec.name}: as the model sees them (after resize and crop)", rows, d.sheet)
                if spec.mask_directory is not None:
                    d.mask_sheet = output_dir / f"doctor_{split}_{spec.index}_masks.png"
                    write_contact_sheet(f"{spec.name}: loss masks at latent resolution (dark red: not learnt)",
                                        masked_item_frames(sheet_items(d.scan.items)), d.mask_sheet)
            results[split].append(d)
            out.write(format_diagnosis(d) + "\n")
            if d.plot is not None:
                out.write(f"  plot: {d.plot}\n")
            if d.sheet is not None:
                out.write(f"  contact sheet: {d.sheet}\n")
            if d.mask_sheet is not None:
                out.write(f"  mask sheet: {d.mask_sheet}\n")
            out.write("\n")
    problems = _blockers(results["train"], results["val"])
    if problems:
        out.write("training cannot start:\n" + "".join(f"  - {p}\n" for p in problems))
        return 2
    total = sum(len(d.scan.items) for d in results["train"] if d.scan)
    out.write(f"ok: {total} training item(s) ready to cache and train\n")
    return 0
