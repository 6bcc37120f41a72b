"""The command line: exit codes, messages without tracebacks, `validate`, logging level from the config."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wantrainer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def complete_config(tmp_path: Path, tiny_kit) -> Path:
    """A config whose every referenced file and folder exists (the DiTs are real: validate reads their type)."""
    import shutil

    for name in ("vae.safetensors", "t5.pth", "lora.safetensors"):
        write(tmp_path / "models" / name, "x")
    shutil.copy(tiny_kit.dit_wan22_low, tmp_path / "models" / "dit.safetensors")
    shutil.copy(tiny_kit.dit_wan22_high, tmp_path / "models" / "high.safetensors")
    (tmp_path / "models" / "tok").mkdir()
    import numpy as np
    from PIL import Image

    from wantrainer.devkit.synthetic import write_mp4

    (tmp_path / "data" / "img").mkdir(parents=True)  # validate probes the media (sizes, frame counts)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "data" / "img" / "a.png")
    (tmp_path / "data" / "vid").mkdir()
    write_mp4(tmp_path / "data" / "vid" / "a.mp4", [np.full((32, 32, 3), i * 10, np.uint8) for i in range(17)])
    write(tmp_path / "data" / "val.jsonl", '{"image_path": "img/a.png", "caption": "red"}\n')
    return write(tmp_path / "cfg" / "run.toml", """
target_model = "wan22"
dit = "../models/dit.safetensors"
dit_high_noise = "../models/high.safetensors"
vae = "../models/vae.safetensors"
t5 = "../models/t5.pth"
t5_tokenizer = "../models/tok"
network_weights = "../models/lora.safetensors"
learning_rate = 3e-4
network_dim = 8
logging_level = "WARNING"

[datasets.general]
resolution = [512, 288]
batch_size = 2

[[datasets.train]]
image_directory = "../data/img"
cache_directory = "../data/cache_img"
num_repeats = 3

[[datasets.train]]
video_directory = "../data/vid"
cache_directory = "../data/cache_vid"
target_frames = [1, 17]

[[datasets.val]]
image_jsonl_file = "../data/val.jsonl"
cache_directory = "../data/cache_val"
""")


def test_validate_ok_prints_changes_and_dataset_lines(complete_config, capsys):
    assert main(["validate", "--config", str(complete_config)]) == 0
    out = capsys.readouterr().out
    assert "learning_rate = 0.0003" in out and "network_dim = 8" in out
    assert "max_train_steps" not in out  # defaults are not listed
    train0 = next(line for line in out.splitlines() if "train[0]:" in line)
    assert "images in" in train0 and "512x288" in train0 and "batch 2" in train0 and "repeats 3" in train0
    train1 = next(line for line in out.splitlines() if "train[1]:" in line)
    assert "videos in" in train1 and "frames [1, 17]" in train1
    assert any("val[0]: image list" in line for line in out.splitlines())
    assert "  train: ready" in out and "  cache-latents: ready" in out
    assert out.rstrip().endswith("config OK for train")


def test_validate_reports_every_missing_path(complete_config, capsys):
    text = complete_config.read_text(encoding="utf-8")
    text = text.replace("../models/vae.safetensors", "../models/missing_vae.safetensors")
    text = text.replace("../data/img", "../data/nowhere").replace("../models/tok", "../models/dit.safetensors")
    complete_config.write_text(text, encoding="utf-8")
    assert main(["validate", "--config", str(complete_config)]) == 2
    err = capsys.readouterr().err
    assert "3 problems with the files and folders" in err
    assert "`vae`" in err and "missing_vae.safetensors does not exist" in err
    assert "`datasets.train[0].image_directory`" in err and "nowhere does not exist" in err
    assert "`t5_tokenizer`" in err and "expected a folder" in err
    assert "Traceback" not in err


def test_an_empty_config_is_not_ok_for_training_and_says_what_each_command_misses(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", "seed = 1\n")
    assert main(["validate", "--config", str(cfg)]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert "note: `dit` is not set" in out and "note: no [[datasets.train]]" in out
    verdict = out[out.index("commands:"):]
    for command, missing in [("cache-latents", "`vae` is not set"), ("cache-text", "`t5` is not set"),
                             ("train", "`dit` is not set"), ("sample", "no [[sample_prompts]] table")]:
        block = verdict[verdict.index(f"  {command}: not ready"):]
        assert missing in block, (command, verdict)
    assert "config OK" not in out and "config not ready for train" in captured.err
    assert main(["validate", "--config", str(cfg), "--for", "all"]) == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("learning_rat = 1e-4\n", "did you mean `learning_rate`?"),
        ('max_train_steps = "many"\n', '`max_train_steps` must be an integer, got "many" (a string)'),
        ('lr_scheduler = "cosin"\n', 'did you mean "cosine"?'),
        ("seed = \n", "malformed TOML at line 1"),
    ],
)
def test_config_errors_exit_2_without_traceback(tmp_path, capsys, text, fragment):
    cfg = write(tmp_path / "c.toml", text)
    assert main(["validate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem in ") and fragment in err and "Traceback" not in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["validate", "--config", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().out


def test_logging_level_from_config_is_applied(complete_config):
    from wantrainer.config_parser import load_config_for_command

    logger = logging.getLogger("wantrainer")
    before = logger.level
    try:
        import argparse

        load_config_for_command(argparse.Namespace(config=str(complete_config), overrides=None))
        assert logger.getEffectiveLevel() == logging.WARNING
        assert any(getattr(h, "_wantrainer", False) for h in logger.handlers)
    finally:
        logger.setLevel(before)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    cfg = write(tmp_path / "c.toml", 'learning_rat = 1e-4\nnetwork_dim = "big"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "wantrainer.cli", "validate", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "2 problems in" in proc.stderr and "did you mean `learning_rate`?" in proc.stderr
    assert '`network_dim` must be an integer, got "big" (a string)' in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="shell wrapper")
def test_run_trainer_wrapper_passes_commands_through(tmp_path):
    cfg = write(tmp_path / "c.toml", "seed = 1\n")
    env = {**os.environ, "WANTRAINER_PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["bash", str(ROOT / "run_trainer.sh"), "validate", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr  # passed through: an empty config is not ready for train
    assert "commands:" in proc.stdout and "config not ready for train" in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="shell wrapper")
def test_run_trainer_wrapper_without_arguments_opens_the_menu(tmp_path):
    env = {**os.environ, "WANTRAINER_PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["bash", str(ROOT / "run_trainer.sh")], input="q\n", capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Config files:" in proc.stdout and "wan21_t2v_14b_lora.toml" in proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="shell wrapper")
def test_shell_scripts_are_valid_bash():
    for name in ("run_trainer.sh", "install.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / name)], timeout=30).returncode == 0, name


def test_batch_wrappers_map_the_same_operations():
    text = (ROOT / "run_trainer.bat").read_text(encoding="utf-8")
    assert "wantrainer.cli menu" in text and "wantrainer.cli train %*" in text and "wantrainer.cli %*" in text
    assert "torch==2.13.0" in (ROOT / "install.bat").read_text(encoding="utf-8")


def test_validate_notes_a_tokenizer_read_as_hub_id(tmp_path, capsys):
    cfg = write(tmp_path / "c.toml", 't5_tokenizer = "google/umt5-xxl"\n')
    assert main(["validate", "--config", str(cfg)]) == 2  # not ready for train; the note is printed first
    assert 'note: `t5_tokenizer` = "google/umt5-xxl" is not a folder' in capsys.readouterr().out


@pytest.mark.skipif(sys.platform == "win32", reason="shell wrapper")
def test_run_trainer_wrapper_config_alone_means_train(tmp_path):
    cfg = write(tmp_path / "c.toml", "seed = 1\n")  # valid, but nothing to train on
    env = {**os.environ, "WANTRAINER_PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["bash", str(ROOT / "run_trainer.sh"), "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # train ran (validate would accept this file and print "config OK"; argparse errors print usage)
    assert "config OK" not in proc.stdout and "usage:" not in proc.stderr and "error: " in proc.stderr


def test_readme_error_example_is_real_output(tmp_path, capsys, monkeypatch):
    readme = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    start = readme.index("error: 3 problems in my.toml:")
    shown = readme[start: readme.index("```", start)].strip()
    write(tmp_path / "my.toml", 'learning_rat = 1e-4\nmax_train_steps = "2000"\nmin_timestep = 900\nmax_timestep = 100\n')
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--config", "my.toml"]) == 2
    assert capsys.readouterr().err.strip() == shown
