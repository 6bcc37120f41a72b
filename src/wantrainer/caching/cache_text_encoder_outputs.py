"""``wantrainer cache-text``: encode every caption with UMT5 into ``{stem}_wan_te.safetensors`` caches.

One text cache per media file (all windows of a video share it). The caption is stored in the ``caption1``
metadata, so with ``skip_existing`` a cache whose caption was edited since is encoded again. Caption dropout is not
applied here: the loader swaps in an empty caption at train time (``caption_dropout_rate``).

Enabled enhancements may ask for more text caches per item (``text_cache_variants``): the caption rewritten
(e.g. DOP's trigger word replaced by the class word), written beside the item's text cache as
``{stem}_wan_te{suffix}.safetensors`` with the same rules; an item whose rewritten caption is ``None`` gets none
(an old file of it is removed); and fixed prompts (``text_cache_prompts``, e.g. a slider's prompt pairs) go into
one file per set in the first training dataset's cache folder.
"""

from __future__ import annotations

import argparse
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from ..common.logger import get_logger
from ..config.datasets import TextEncoderCacheConfig
from ..dataset.cache_format import AmbiguousCacheError, check_text_cache, save_text_cache
from .common import (
    TEXT_FILE,
    CacheSummary,
    NoProgress,
    Progress,
    compute_dtype,
    encode_todo,
    finish,
    is_finite,
    require_file,
    start_run,
)

logger = get_logger(__name__)


def load_text_encoder(model_cfg, settings: TextEncoderCacheConfig, device: torch.device):
    """The UMT5 encoder of ``model_cfg`` (``t5``, ``t5_tokenizer``) on the configured device; fp32 on CPU."""
    from ..models.wan.text_encoder import WanTextEncoder, load_tokenizer

    tokenizer = load_tokenizer(model_cfg.t5_tokenizer)
    t5 = require_file(model_cfg.t5, "t5", "UMT5 text encoder file")
    return WanTextEncoder.load(t5, tokenizer, device=device, dtype=compute_dtype("auto", device), fp8=settings.fp8_t5)


def _up_to_date(path: Path, caption: str) -> bool:
    """The cache exists, is readable, holds one embedding tensor and was made from ``caption`` (or does not record
    its caption). A file holding two (musubi-tuner re-cached in another dtype over it) is encoded again."""
    if not path.is_file():
        return False
    try:
        check_text_cache(path)
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("caption1")
    except AmbiguousCacheError as exc:
        logger.info("%s; encoding it again", exc)
        return False
    except Exception:  # truncated or foreign file: encode it again
        return False
    return recorded is None or recorded == caption


def _write_all(pending: list[tuple[Path, str, Future | None]], summary: CacheSummary) -> None:
    for path, _, future in pending:
        try:
            if future is not None:
                future.result()
            summary.cached += 1
        except OSError as exc:
            summary.failed.append((path, f"cannot write: {exc}"))


def _warn_long_captions(batch: list[tuple[Path, str]], encoder) -> None:
    for (path, _), count in zip(batch, encoder.token_counts([c for _, c in batch])):
        if count > encoder.max_length:
            logger.warning("%s: the caption has %d tokens; the text encoder reads only the first %d, the rest is "
                           "cut off: shorten it", path.name, count, encoder.max_length)


def _encode_all(todo: list[tuple[Path, str]], encoder, settings: TextEncoderCacheConfig, summary: CacheSummary,
                progress: Progress) -> None:
    """Encode in batches; ``num_workers`` threads write the files while the encoder works on the next batch."""
    pool = ThreadPoolExecutor(settings.num_workers, "cache-writer") if settings.num_workers > 0 else None
    pending: list[tuple[Path, str, Future | None]] = []
    with pool or nullcontext():
        for i in range(0, len(todo), settings.batch_size):
            batch = todo[i:i + settings.batch_size]
            _warn_long_captions(batch, encoder)
            for (path, caption), embeds in zip(batch, encoder.encode([c for _, c in batch])):
                if not is_finite(embeds):
                    summary.non_finite.append(path.name)
                    summary.failed.append((path, f"embeddings of {caption!r} contain NaN / Inf (not written)"))
                    continue
                if pool is None:
                    save_text_cache(path, embeds, caption)
                    pending.append((path, caption, None))
                else:
                    pending.append((path, caption, pool.submit(save_text_cache, path, embeds.cpu(), caption)))
            progress.advance(len(batch))
    _write_all(pending, summary)


def cache_text(cfg, progress: Progress | None = None) -> CacheSummary:
    """Encode the captions of every train / val dataset of ``cfg`` (a ``WanTrainerConfig``)."""
    settings = cfg.datasets.text_encoder_cache
    progress = progress or NoProgress()
    from ..models.wan.conditioning import run_model_type

    # the model type decides which windows a clip gives (the TI2V-5B's 24 fps, with source_fps): their captions
    job = start_run("text", cfg.datasets, settings.device, "datasets.text_encoder_cache.device",
                    lambda item: item.text_cache_path, run_model_type(cfg.model))
    summary = job.summary
    captions: dict[Path, str] = {}
    for item in job.items:
        captions.setdefault(item.text_cache_path, item.caption)
    captions.update(_variant_captions(cfg, captions))
    todo = []
    for path, caption in captions.items():
        if settings.skip_existing and _up_to_date(path, caption):
            summary.skipped += 1
        else:
            todo.append((path, caption))
    prompt_sets = _stale_prompt_sets(cfg, settings.skip_existing, summary)

    def encode(encoder) -> None:
        _encode_all(todo, encoder, settings, summary, progress)
        _encode_prompt_sets(prompt_sets, encoder, summary, progress)

    encode_todo([*todo, *prompt_sets], lambda: load_text_encoder(cfg.model, settings, job.device), encode, progress,
                "cache-text")
    return finish(job, TEXT_FILE, settings.keep_cache)

def _variant_captions(cfg, captions: dict[Path, str]) -> dict[Path, str]:
    """The enhancements' rewritten captions by cache path; stale variant files (no caption now) are removed."""
    from ..enhancements.registry import build_enhancements

    out: dict[Path, str] = {}
    for enh in build_enhancements(cfg):
        for variant in enh.text_cache_variants():
            for path, caption in captions.items():
                target = path.with_name(f"{path.stem}{variant.suffix}.safetensors")
                rewritten = variant.caption_for(caption)
                if rewritten is not None:
                    out[target] = rewritten
                elif target.is_file():
                    target.unlink()
                    logger.info("removed %s: its caption has no %s variant now", target.name, enh.name)
    return out


def _stale_prompt_sets(cfg, skip_existing: bool, summary: CacheSummary) -> list[tuple[Path, dict[str, str]]]:
    """(file, prompts) of the enhancements' prompt sets to encode (with ``skip_existing``: those not current)."""
    from ..enhancements.base import prompt_set_path
    from ..enhancements.registry import build_enhancements

    out = []
    for enh in build_enhancements(cfg):
        for prompt_set in enh.text_cache_prompts():
            path = prompt_set_path(cfg, prompt_set.file_name)
            if skip_existing and path.is_file():
                try:
                    with safe_open(str(path), framework="pt") as f:
                        recorded, keys = f.metadata() or {}, set(f.keys())
                    if all(recorded.get(k) == v and k in keys for k, v in prompt_set.prompts.items()):
                        summary.skipped += 1
                        continue
                except Exception:  # truncated or foreign file: encode it again
                    pass
            out.append((path, dict(prompt_set.prompts)))
    return out


def _encode_prompt_sets(sets: list[tuple[Path, dict[str, str]]], encoder, summary: CacheSummary,
                        progress: Progress) -> None:
    from ..dataset.cache_format import ARCHITECTURE, FORMAT_VERSION
    from ..utils.atomic import save_safetensors_atomic

    for path, prompts in sets:
        keys = list(prompts)
        embeds = encoder.encode([prompts[k] for k in keys])
        bad = [k for k, e in zip(keys, embeds) if not is_finite(e)]
        if bad:
            summary.failed.append((path, f"embeddings of {prompts[bad[0]]!r} contain NaN / Inf (not written)"))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **prompts}
            save_safetensors_atomic({k: e.detach().cpu().contiguous() for k, e in zip(keys, embeds)}, path,
                                    metadata=meta)
            summary.cached += 1
        progress.advance(1)


def run(args: argparse.Namespace) -> int:
    from .cli_support import run_caching

    return run_caching(args, cache_text, "cache-text")
