"""Takenoko -> our config.

Takenoko's TOML has our layout (flat top-level keys, ``[datasets.*]`` tables, ``[[sample_prompts]]``), so keys
that are ours are kept with their values (validated by our schema), a few are renamed, and the rest, Takenoko's
own features, are listed. Model paths given as download URLs are listed: download the file and set the key.
Relative paths (read from the folder Takenoko runs in, the working folder) are rewritten relative to the new
config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...errors import UserError
from .. import FLAT_SECTIONS, DatasetEntry, LatentCacheConfig, SamplePrompt, TextEncoderCacheConfig
from .common import ImportResult, read_toml, relocate

_ATTENTION = {"sdpa": "sdpa", "flash_attn": "flash_attn", "flash3": "flash_attn", "sage_attn": "sage_attn",
              "xformers": "xformers", "split_attn": "split_attn"}
_PATH_KEYS = {"dit", "dit_high_noise", "vae", "t5", "network_weights", "output_dir", "resume", "logging_dir"}
_DATASET_PATHS = {"image_directory", "video_directory", "image_jsonl_file", "video_jsonl_file", "cache_directory",
                  "mask_directory"}
_RENAMED_DATASET_KEYS = {"mask_path": "mask_directory"}
"""Takenoko's ``mask_path``: a folder of ``{stem}.png`` masks, white = learn (our ``mask_directory``)."""
_TAKENOKO_UNMASKED_WEIGHT = 0.1
"""Takenoko's default ``unmasked_weight`` (ours is 0)."""
_RENAMED_PROMPT_KEYS = {"step": "steps", "guidance_scale": "cfg_scale", "negative": "negative_prompt",
                        "num_frames": "frames"}
_REASONS = {
    "embed_config_in_metadata": "the resolved config is always embedded (paths reduced to names unless "
                                "metadata_full_paths; none with no_metadata)",
    "enhanced_progress_bar": "the progress bar is always on (plain lines when stderr is not a terminal)",
    "log_config": "the resolved config is always saved beside the LoRA",
    "launch_tensorboard_server": "start it yourself: tensorboard --logdir {output_dir}/logs",
    "tensorboard_host": "start TensorBoard yourself",
    "tensorboard_port": "start TensorBoard yourself",
    "tensorboard_auto_reload": "start TensorBoard yourself",
    "use_unique_noise_per_batch": "every item of a batch always gets its own noise here",
    "lr_decay_steps": "no decay phase here; use lr_scheduler (e.g. cosine_with_min_lr)",
    "network_module": "only networks.lora_wan (the LoRA family) is trained here",
}


def _top_keys() -> set[str]:
    return {key for cls in FLAT_SECTIONS.values() for key in cls.model_fields}


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and re.match(r"^[a-z]+://", value) is not None


def _table(values: dict[str, Any], cls: type, where: str, paths: set[str], cwd: Path, output_dir: Path,
           result: ImportResult, renamed: dict[str, str] | None = None) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = (renamed or {}).get(key, key)
        if name in cls.model_fields:
            out[name] = relocate(value, cwd, output_dir) if name in paths and isinstance(value, str) else value
        else:
            result.drop(where, key, value, "no equivalent setting in this table here")
    return out


def _datasets(data: dict[str, Any], source: str, cwd: Path, output_dir: Path, result: ImportResult) -> None:
    datasets = result.data.setdefault("datasets", {})
    tables = {"general": DatasetEntry, "latent_cache": LatentCacheConfig, "text_encoder_cache": TextEncoderCacheConfig}
    for name, value in data.items():
        where = f"{source} [datasets.{name}]"
        if name in tables and isinstance(value, dict):
            datasets[name] = _table(value, tables[name], where, _DATASET_PATHS, cwd, output_dir, result,
                                    _RENAMED_DATASET_KEYS)
        elif name in ("train", "val") and isinstance(value, list):
            datasets[name] = [_table(entry, DatasetEntry, f"{where} {i}", _DATASET_PATHS, cwd, output_dir, result,
                                     _RENAMED_DATASET_KEYS)
                              for i, entry in enumerate(value)]
        else:
            result.drop(source, f"datasets.{name}", value, "no such dataset table here")


def _top_level(key: str, value: Any, source: str, cwd: Path, output_dir: Path, result: ImportResult) -> None:
    data = result.data
    if key in _PATH_KEYS and _is_url(value):
        result.drop(source, key, value, f"a download URL: download the file and set `{key}` to its path")
    elif key in _top_keys() and key != "network_module":
        data[key] = relocate(value, cwd, output_dir) if key in _PATH_KEYS and isinstance(value, str) else value
    elif key == "network_module" and value == "networks.lora_wan":
        data[key] = value
    elif key in _ATTENTION:
        if value is True:
            data["attn_mode"] = _ATTENTION[key]
    elif key in _REASONS:
        result.drop(source, key, value, _REASONS[key])
    elif isinstance(value, dict | list):
        result.drop(source, key, value, "a Takenoko feature with no equivalent here")
    else:
        result.drop(source, key, value, "no equivalent setting here")


_TREAD_KEYS = {"selection_ratio": "tread_selection_ratio", "start_layer_idx": "tread_start_layer_idx",
               "end_layer_idx": "tread_end_layer_idx"}


def _tread(data: dict[str, Any], source: str, result: ImportResult) -> None:
    """Takenoko's TREAD keys (``enable_tread``, ``tread_mode``, ``tread_config_routeN`` strings of
    ``key=value; ...``) -> our one route; taken out of ``data``. Takenoko's ratio is the share of tokens routed
    around the span and its end block is included, as here."""
    routes = sorted((k for k in data if re.fullmatch(r"tread_config_route\d+", k)), key=lambda k: int(k[18:]))
    enabled, mode = data.pop("enable_tread", False), data.pop("tread_mode", "full")
    values = {k: data.pop(k) for k in routes}
    if not enabled:
        for key, value in values.items():
            result.drop(source, key, value, "TREAD is off in this file (enable_tread = false)")
        return
    if mode != "full":
        result.drop(source, "tread_mode", mode, 'only random token routing (tread_mode = "full") exists here; '
                    "frame / row routing has no equivalent")
        return
    if not values:
        result.drop(source, "enable_tread", enabled, "no tread_config_route1 to take the route from")
        return
    first, *others = routes
    try:
        pairs = dict(part.split("=", 1) for part in str(values[first]).replace(" ", "").split(";") if part)
        route = {_TREAD_KEYS[k]: (float(v) if k == "selection_ratio" else int(v)) for k, v in pairs.items()
                 if k in _TREAD_KEYS}
    except ValueError:
        route = {}
    if len(route) != 3:
        result.drop(source, first, values[first], "not of the form selection_ratio=R; start_layer_idx=S; "
                    "end_layer_idx=E")
        return
    result.data.update(route)
    for key in others:
        result.drop(source, key, values[key], f"one TREAD route here: {first} was taken")


def convert(files: list[Path], output_dir: Path) -> ImportResult:
    if len(files) != 1:
        raise UserError("--from takenoko takes one config file (its datasets are inside it)")
    path = files[0]
    data = read_toml(path)
    result = ImportResult()
    cwd = Path.cwd()
    _tread(data, path.name, result)
    for key, value in data.items():
        if key == "datasets" and isinstance(value, dict):
            _datasets(value, path.name, cwd, output_dir, result)
        elif key == "sample_prompts" and isinstance(value, list):
            result.data["sample_prompts"] = [
                _table(p, SamplePrompt, f"{path.name} [[sample_prompts]] {i}", set(), cwd, output_dir, result,
                       _RENAMED_PROMPT_KEYS)
                for i, p in enumerate(value)]
        else:
            _top_level(key, value, path.name, cwd, output_dir, result)
    if result.data.get("use_masked_training_with_prior") and "unmasked_weight" not in result.data:
        result.data["unmasked_weight"] = _TAKENOKO_UNMASKED_WEIGHT
        result.notes.append(f"unmasked_weight = {_TAKENOKO_UNMASKED_WEIGHT} written out: Takenoko's default (here "
                            "the default is 0, black ignored)")
    result.notes.append("relative paths were read from the working folder (as Takenoko reads them) and written "
                        "relative to the new config; `wantrainer validate` checks that they exist")
    return result
