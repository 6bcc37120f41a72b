"""Names other Wan trainers use (musubi-tuner, Takenoko, diffusion-pipe, ai-toolkit) and what ours are.

An unknown key or flag that is one of these gets a message that names our key instead of a spelling guess.
``wantrainer config import`` converts whole files; this table only explains single names.
"""

from __future__ import annotations

_ATTENTION = {"sdpa", "flash_attn", "flash3", "sage_attn", "xformers", "split_attn"}

FOREIGN_KEYS: dict[str, str] = {
    "task": 'ours is `target_model` = "wan21" or "wan22" (the model size, 1.3B or 14B, is read from the DiT file)',
    "dataset_config": "ours has no separate dataset file: write the datasets in this config as [datasets.general], "
                      "[[datasets.train]] and [[datasets.val]] tables (`wantrainer config import --from musubi` "
                      "converts a dataset TOML)",
    "general": "the shared dataset settings are the [datasets.general] table here (musubi-tuner's [general])",
    "dit_dtype": "ours is `dit_weight_dtype` (storage of the block Linear weights) with `mixed_precision` (compute dtype)",
    "vae_dtype": "ours is `vae_dtype` in the [datasets.latent_cache] table",
    "vae_cache_cpu": "ours is `vae_cache_cpu` in the [datasets.latent_cache] table",
    "vae_tiling": "ours is `vae_tiling` in the [datasets.latent_cache] table",
    "fp8_t5": "ours is `fp8_t5` in the [datasets.text_encoder_cache] table",
    "fp8_llm": "ours is `fp8_t5` in the [datasets.text_encoder_cache] table",
    "sample_prompts_file": "write each prompt as a [[sample_prompts]] table with `text`",
    "sample_at_first_step": "ours is `sample_at_first`",
    "validation_dataset_config": "write the validation data as [[datasets.val]] tables",
    "max_train_epoch": "ours is `max_train_epochs`",
    "lr": "ours is `learning_rate`",
    "rank": "ours is `network_dim`",
    "lora_rank": "ours is `network_dim`",
    "alpha": "ours is `network_alpha`",
    "lora_alpha": "ours is `network_alpha`",
    "epochs": "ours is `max_train_epochs`",
    "steps": "ours is `max_train_steps`",
    "resume_from_checkpoint": "ours is `resume` (a state folder) or `auto_resume = true`",
    "save_every_n_epoch": "ours is `save_every_n_epochs`",
    "transformer_path": "ours is `dit` (the DiT .safetensors file)",
    "ckpt_path": "ours is `dit` (the DiT .safetensors file)",
    "log_dir": "ours is `logging_dir`",
    "gradient_checkpointing_offload": "ours is `gradient_checkpointing_cpu_offload`",
    "min_timestep_boundary": "ours are `min_timestep` / `max_timestep` (0-1000)",
    "datasets_train": "write [[datasets.train]] tables",
    "enable_tread": "ours is TREAD on when `tread_selection_ratio` > 0, with the span `tread_start_layer_idx` .. "
                    "`tread_end_layer_idx` (one route)",
    "tread_config": "ours are three keys: `tread_selection_ratio`, `tread_start_layer_idx`, `tread_end_layer_idx`",
    "tread_config_route1": "ours are `tread_selection_ratio`, `tread_start_layer_idx` and `tread_end_layer_idx`",
}


def foreign_hint(key: str) -> str | None:
    """What to write instead of ``key`` when it is another trainer's name, else None."""
    if key in _ATTENTION:
        value = "flash_attn" if key == "flash3" else key
        return f'ours is one key for the attention backend: `attn_mode = "{value}"`'
    return FOREIGN_KEYS.get(key)
