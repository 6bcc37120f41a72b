"""musubi-tuner -> our config.

Reads any mix of: a dataset TOML (``[general]`` + ``[[datasets]]``), a training ``--config_file`` TOML (flat or
in sections, which musubi-tuner flattens), and a text file holding the command line of
``wan_train_network.py`` (``accelerate launch ... --task t2v-14B --dit ... --network_dim 32``; line continuations
allowed). ``--dataset_config`` and ``--sample_prompts`` files named there are read too when they exist.
Relative paths (musubi-tuner reads them from the folder it runs in) are read from the working folder and
rewritten relative to the new config.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ...errors import UserError
from .common import ImportResult, read_toml, relocate

# Keys whose name and meaning are ours too (top level).
_SAME = {
    "dit", "dit_high_noise", "vae", "t5", "fp8_base", "fp8_scaled", "blocks_to_swap", "gradient_checkpointing",
    "gradient_checkpointing_cpu_offload", "mixed_precision", "timestep_boundary", "offload_inactive_dit",
    "max_train_steps", "max_train_epochs", "seed", "gradient_accumulation_steps", "max_grad_norm",
    "max_data_loader_n_workers", "persistent_data_loader_workers", "optimizer_type", "optimizer_args",
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power",
    "lr_scheduler_min_lr_ratio", "network_dim", "network_alpha", "network_dropout", "network_args",
    "network_weights", "timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme",
    "logit_mean", "logit_std", "mode_scale", "min_timestep", "max_timestep", "output_dir", "output_name",
    "save_every_n_steps", "save_every_n_epochs", "save_last_n_steps", "save_last_n_epochs", "save_state",
    "resume", "logging_dir", "log_with", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
    "metadata_title", "metadata_author", "metadata_description", "metadata_license", "no_metadata",
    "huber_c", "loss_type",
}
_PATH_KEYS = {"dit", "dit_high_noise", "vae", "t5", "network_weights", "output_dir", "resume", "logging_dir"}
_CACHE_KEYS = {"vae_cache_cpu": "latent_cache", "vae_dtype": "latent_cache", "vae_tiling": "latent_cache",
               "fp8_t5": "text_encoder_cache"}
_ATTENTION = {"sdpa": "sdpa", "flash_attn": "flash_attn", "flash3": "flash_attn", "sage_attn": "sage_attn",
              "xformers": "xformers", "split_attn": "split_attn"}
_REASONS = {
    "network_module": "only networks.lora_wan (the LoRA family) is trained here",
    "preserve_distribution_shape": "always on here: min_timestep / max_timestep rescale the draw and keep its shape",
    "num_timestep_buckets": "no timestep buckets here; the draw follows timestep_sampling",
    "lr_decay_steps": "no decay phase here; use lr_scheduler (e.g. cosine_with_min_lr)",
    "guidance_scale": "Wan trains without embedded guidance; sampling sets cfg_scale per [[sample_prompts]]",
    "clip": "only T2V models are trained here (CLIP vision is for I2V)",
    "i2v": "only T2V models are trained here",
    "dit_dtype": "set by dit_weight_dtype (storage) and mixed_precision (compute) here",
    "log_prefix": "no run-name prefix here; each run logs to logging_dir",
    "log_tracker_name": "no tracker names here",
    "log_config": "the resolved config is always saved beside the LoRA",
    "save_last_n_steps_state": "states follow save_last_n_steps here",
    "save_last_n_epochs_state": "states follow save_last_n_epochs here",
    "show_timesteps": "look at the timestep histogram in TensorBoard instead",
    "ddp_timeout": "multi-GPU runs are set up by accelerate here",
    "ddp_gradient_as_bucket_view": "multi-GPU runs are set up by accelerate here",
    "ddp_static_graph": "multi-GPU runs are set up by accelerate here",
    "metadata_tags": None,  # converted below
    "training_comment": None,
    "dataset_config": None,
    "sample_prompts": None,
    "task": None,
    "config_file": "this file is the one being imported",
    "num_cpu_threads_per_process": "an accelerate launch option, not a training setting",
}
_DATASET_SAME = {
    "image_directory", "video_directory", "image_jsonl_file", "video_jsonl_file", "cache_directory",
    "caption_extension", "resolution", "enable_bucket", "bucket_no_upscale", "batch_size", "num_repeats",
    "target_frames", "frame_extraction", "frame_stride", "frame_sample", "max_frames", "source_fps",
}
_DATASET_PATHS = {"image_directory", "video_directory", "image_jsonl_file", "video_jsonl_file", "cache_directory"}
_DATASET_REASONS = {
    "control_directory": "control videos / images (Fun-Control, Kontext) are not trained here",
    "multiple_target": "multiple-target images are not trained here",
    "no_resize_control": "control images are not trained here",
    "control_resolution": "control images are not trained here",
    "debug_dataset": "use `wantrainer doctor` to inspect the datasets",
}
_TASKS = {"t2v-1.3B": "wan21", "t2v-14B": "wan21", "t2v-A14B": "wan22"}


def parse_flags(text: str) -> dict[str, Any]:
    """A musubi-tuner command line -> {key: True | text | [texts]} (everything before the script is skipped)."""
    words = shlex.split(text.replace("\\\r\n", " ").replace("\\\n", " ").replace("^\r\n", " "), comments=True)
    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
    words = words[scripts[-1] + 1:] if scripts else words
    flags: dict[str, Any] = {}
    key = None
    for word in words:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            key = name.replace("-", "_")
            flags[key] = value if eq else True
            if eq:
                key = None
        elif key is not None:
            current = flags[key]
            flags[key] = word if current is True else (current if isinstance(current, list) else [current]) + [word]
    return flags


def _typed(key: str, value: Any) -> Any:
    """A flag's text as our key's type (the same reading as our own command line)."""
    from ..overrides import override_fields, override_values

    if key not in override_fields() or not isinstance(value, str | list):
        return value
    return override_values({key: value}, Path.cwd())[key]


def parse_sample_prompts(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """musubi-tuner's prompt file (``text --w 832 --h 480 --f 81 --d 42 --s 20 --l 5.0 --n neg``) -> tables."""
    options = {"w": ("width", int), "h": ("height", int), "f": ("frames", int), "d": ("seed", int),
               "s": ("steps", int), "l": ("cfg_scale", float), "fs": ("discrete_flow_shift", float),
               "n": ("negative_prompt", str)}
    prompts, unused = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(" --")
        table: dict[str, Any] = {"text": parts[0].strip()}
        for part in parts[1:]:
            name, _, value = part.partition(" ")
            if name in options:
                key, kind = options[name]
                table[key] = kind(value.strip())
            else:
                unused.append(f"--{name} in prompt {len(prompts)}")
        prompts.append(table)
    return prompts, unused


def convert_dataset(data: dict[str, Any], source: str, source_dir: Path, output_dir: Path,
                    result: ImportResult) -> None:
    """A dataset TOML: [general] -> [datasets.general], each [[datasets]] -> [[datasets.train]]."""
    for key, value in data.items():
        if key not in ("general", "datasets"):
            result.drop(source, key, value, "not a dataset setting ([general] and [[datasets]] are)")
    general = _dataset_entry(data.get("general", {}), f"{source} [general]", source_dir, output_dir, result)
    if general:
        result.dataset_table("general").update(general)
    for index, entry in enumerate(data.get("datasets", [])):
        converted = _dataset_entry(entry, f"{source} [[datasets]] {index}", source_dir, output_dir, result)
        result.data.setdefault("datasets", {}).setdefault("train", []).append(converted)


def _dataset_entry(entry: dict[str, Any], where: str, source_dir: Path, output_dir: Path,
                   result: ImportResult) -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        if key in _DATASET_SAME:
            out[key] = relocate(value, source_dir, output_dir) if key in _DATASET_PATHS else value
        else:
            result.drop(where, key, value, _DATASET_REASONS.get(key, "no equivalent dataset setting here"))
    return out


def convert_training(args: dict[str, Any], source: str, source_dir: Path, output_dir: Path,
                     result: ImportResult) -> None:
    """Training arguments (from a --config_file TOML or a command line) -> top-level keys."""
    data = result.data
    for key, value in args.items():
        if key in _PATH_KEYS and isinstance(value, str):
            data[key] = relocate(value, source_dir, output_dir)
        elif key == "network_args":
            args_list = _typed(key, value)
            lora_plus = [a for a in args_list if str(a).replace(" ", "").startswith("loraplus_lr_ratio=")]
            for entry in lora_plus:  # musubi-tuner passes LoRA+ as a network argument; ours is a key
                data["loraplus_lr_ratio"] = _typed("loraplus_lr_ratio", entry.split("=", 1)[1].strip())
            data[key] = [a for a in args_list if a not in lora_plus]
        elif key in _SAME:
            data[key] = _typed(key, value)
        elif key in _ATTENTION and value not in (False, "false", "False"):
            data["attn_mode"] = _ATTENTION[key]
        elif key in _CACHE_KEYS:
            table = result.dataset_table(_CACHE_KEYS[key])
            table[key] = True if value is True else value
        elif key == "task":
            if value in _TASKS:
                data["target_model"] = _TASKS[value]
            else:
                result.drop(source, key, value, "only the T2V tasks t2v-1.3B, t2v-14B and t2v-A14B are trained here")
        elif key == "network_module" and value == "networks.lora_wan":
            data[key] = value
        elif key == "metadata_tags":
            data["metadata_tags"] = [t.strip() for t in str(value).split(",") if t.strip()]
        elif key == "training_comment":
            data["metadata_description"] = value
        elif key == "dataset_config":
            _follow(value, source_dir, output_dir, result, source, "dataset_config")
        elif key == "sample_prompts":
            _follow(value, source_dir, output_dir, result, source, "sample_prompts")
        elif _REASONS.get(key):
            result.drop(source, key, value, _REASONS[key])
        else:
            result.drop(source, key, value, "no equivalent setting here")


def _follow(value: Any, source_dir: Path, output_dir: Path, result: ImportResult, source: str, key: str) -> None:
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else source_dir / path
    if not path.is_file():
        result.drop(source, key, value, f"{path} not found: give that file to `config import` as well")
        return
    if key == "dataset_config":
        convert_dataset(read_toml(path), path.name, source_dir, output_dir, result)
        return
    prompts, unused = parse_sample_prompts(path.read_text(encoding="utf-8"))
    result.data["sample_prompts"] = prompts
    for item in unused:
        result.drop(path.name, item.split()[0], item, "no per-prompt equivalent here (I2V image, control video, "
                                                        "embedded guidance)")


def convert(files: list[Path], output_dir: Path) -> ImportResult:
    result = ImportResult()
    cwd = Path.cwd()
    for path in files:
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        if path.suffix.lower() == ".toml":
            data = read_toml(path)
            if "datasets" in data or "general" in data:
                convert_dataset(data, path.name, cwd, output_dir, result)
            else:
                flat = {}
                for key, value in data.items():  # musubi-tuner flattens [sections] of a --config_file
                    flat.update(value if isinstance(value, dict) else {key: value})
                convert_training(flat, path.name, cwd, output_dir, result)
        else:
            convert_training(parse_flags(path.read_text(encoding="utf-8")), path.name, cwd, output_dir, result)
    result.notes.append("relative paths were read as musubi-tuner reads them, from the working folder, and written "
                        "relative to the new config; `wantrainer validate` checks that they exist")
    return result
