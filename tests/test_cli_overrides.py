"""Top-level keys on the command line (typed and checked as in TOML), `train --resume`, foreign names explained."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from train_support import lora_tensors, write_config
from wantrainer.cli import main
from wantrainer.config_parser import load_config, parse_config
from wantrainer.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg" / "run.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    return info.value.problems


def test_overrides_are_typed_like_toml(tmp_path, monkeypatch):
    config = _write(tmp_path, "max_train_steps = 100\nlearning_rate = 3e-4\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, overrides={
        "max_train_steps": "10", "learning_rate": "1e-5", "gradient_checkpointing": "true",
        "network_args": ["verbose=True", "include_patterns=['ffn']"], "optimizer_type": "adamw8bit",
        "output_name": "123", "validation_timesteps": ["200,500"], "lr_warmup_steps": "0.1",
        "output_dir": "runs/a", "dit": "models/dit.safetensors",
    })
    assert cfg.training.max_train_steps == 10 and cfg.optimizer.learning_rate == 1e-5
    assert cfg.model.gradient_checkpointing is True
    assert cfg.network.network_args == ["verbose=True", "include_patterns=['ffn']"]
    assert cfg.optimizer.optimizer_type == "adamw8bit" and cfg.saving.output_name == "123"
    assert cfg.validation.validation_timesteps == [200, 500] and cfg.optimizer.lr_warmup_steps == 0.1
    # paths on the command line are relative to the working folder, paths in the file to the file
    assert cfg.saving.output_dir == tmp_path / "runs" / "a"
    assert cfg.model.dit == tmp_path / "models" / "dit.safetensors"
    assert "max_train_steps = 10" in cfg.to_toml()  # the saved config is the one that ran


def test_override_problems_read_as_in_toml(tmp_path):
    config = _write(tmp_path, "")
    for flag, text, toml_text in [("max_train_steps", "abc", 'max_train_steps = "abc"'),
                                  ("learning_rate", "-1", "learning_rate = -1"),
                                  ("lr_scheduler", "cosin", 'lr_scheduler = "cosin"'),
                                  ("network_dim", "4.5", "network_dim = 4.5")]:
        with pytest.raises(ConfigError) as info:
            load_config(config, overrides={flag: text})
        assert info.value.problems == [f"{p} (from --{flag})" for p in _problems(toml_text)], flag
    with pytest.raises(ConfigError, match=r"did you mean \"cosine\"\?.*\(from --lr_scheduler\)"):
        load_config(config, overrides={"lr_scheduler": "cosin"})


def test_command_line_flags(tmp_path, capsys):
    config = _write(tmp_path, "logging_level = \"WARNING\"\n")
    # exit 2: this config names no DiT, so train could not start; the values are printed first
    assert main(["validate", "--config", str(config), "--max_train_steps", "12", "--gradient_checkpointing",
                 "--fp8_base", "false", "--network_args", "verbose=True", "exclude_patterns=['.*ffn.*']"]) == 2
    out = capsys.readouterr().out
    assert "max_train_steps = 12" in out and "gradient_checkpointing = true" in out
    assert 'network_args = ["verbose=True", "exclude_patterns=[\'.*ffn.*\']"]' in out and "fp8_base" not in out
    assert main(["validate", "--config", str(config), "--max_train_steps", "x"]) == 2
    err = capsys.readouterr().err
    assert "`max_train_steps` must be an integer" in err and "(from --max_train_steps)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["--max_train_step", "10"], "unknown option --max_train_step; did you mean --max_train_steps?"),
    (["--learning-rate", "1e-4"], "unknown option --learning-rate; did you mean --learning_rate?"),
    (["--task", "t2v-1.3B"], "unknown option --task: ours is `target_model`"),
    (["--sdpa"], 'unknown option --sdpa: ours is one key for the attention backend: `attn_mode = "sdpa"`'),
    (["--dataset_config", "d.toml"], "unknown option --dataset_config: ours has no separate dataset file"),
])
def test_unknown_flags_get_the_nearest_or_our_name(tmp_path, capsys, argv, expected):
    config = _write(tmp_path, "")
    assert main(["train", "--config", str(config), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_foreign_keys_in_a_file_name_ours():
    assert _problems('task = "t2v-14B"') == [
        'unknown key `task`: ours is `target_model` = "wan21" or "wan22" (the model size, 1.3B or 14B, is read '
        "from the DiT file)"]
    assert 'attn_mode = "sdpa"' in _problems("sdpa = true")[0]
    assert 'attn_mode = "flash_attn"' in _problems("flash3 = true")[0]
    assert "[datasets.general], [[datasets.train]]" in _problems('dataset_config = "d.toml"')[0]
    assert "[datasets.general]" in _problems("[general]\nresolution = [960, 544]\n")[0]
    assert "[[datasets.train]]" in _problems('[[datasets]]\nimage_directory = "x"\n')[0]
    assert "[datasets.latent_cache]" in _problems('vae_dtype = "bfloat16"')[0]


def test_train_resume_from_the_command_line(train_workspace, tmp_path, monkeypatch, capsys):
    """`--resume PATH` (relative to the working folder) continues a saved run at its step and ends exactly
    where the uninterrupted run ended."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.toml", train_workspace.config(tmp_path / "unused", log_with="none"))
    common = ["train", "--config", str(config), "--max_train_steps", "4"]
    assert main([*common, "--seed", "1", "--save_every_n_steps", "2", "--save_state", "--output_dir", "a"]) == 0
    assert (tmp_path / "a" / "lora-step00000002-state").is_dir()
    capsys.readouterr()
    assert main([*common, "--seed", "1", "--resume", "a/lora-step00000002-state", "--output_dir", "b"]) == 0
    assert f"resumed from {tmp_path / 'a' / 'lora-step00000002-state'} at step 2" in capsys.readouterr().err
    assert main([*common, "--output_dir", "c"]) == 0  # seed 7 from the start: another trajectory
    saved, resumed, other = (lora_tensors(tmp_path / d / "lora.safetensors") for d in "abc")
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    assert any(not torch.equal(saved[k], other[k]) for k in saved)
    assert main([*common, "--resume", "missing-state", "--output_dir", "d"]) == 2
