"""What a user meets first: typical mistakes end with a message naming the key or file and exit code 2 (no
traceback), progress output stays readable in a log file, the command line describes itself, Ctrl-C + resume."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from train_support import write_config
from wantrainer import __version__
from wantrainer.cli import COMMANDS, build_parser, main
from wantrainer.common.logger import _BarAwareHandler
from wantrainer.common.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, kit, train: dict, **top) -> Path:
    values = {"dit": str(kit.dit_wan21), "vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir),
              "mixed_precision": "no", "output_dir": str(tmp_path / "out"), **top,
              "datasets": {"general": {"resolution": [64, 64]}, "train": [train]}}
    return write_config(tmp_path / "my.toml", values)


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text, text
    return code, text


def _images(folder: Path, count: int, captions: bool = True) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a blue square number {i}", encoding="utf-8")
    return folder


def test_media_folder_without_media_stops_every_command(tmp_path, capsys, tiny_kit):
    (tmp_path / "photos").mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    earlier = cache / "old_0064x0064_wan.safetensors"  # named like our caches: keep_cache = false would delete it
    earlier.write_bytes(b"x")
    config = _config(tmp_path, tiny_kit, {"image_directory": "photos", "cache_directory": "cache"})
    for command in ("validate", "doctor", "cache-latents", "cache-text", "train"):
        code, text = _run(capsys, command, "--config", str(config))
        assert code == 2, command
        assert "datasets.train[0]" in text and "image_directory" in text, (command, text)
        assert f"no image files (png jpg jpeg webp bmp) in {tmp_path / 'photos'}" in text or "holds no image" in text
    assert earlier.exists(), "a mistyped folder must not make cache-latents delete the caches it cannot see"


def test_videos_given_as_image_directory_names_the_right_key(tmp_path, capsys, tiny_kit):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"x")  # listing media reads no file
    config = _config(tmp_path, tiny_kit, {"image_directory": "clips"})
    code, text = _run(capsys, "validate", "--config", str(config))
    assert code == 2
    assert "`datasets.train[0].image_directory`" in text and "1 video file(s): write `video_directory`" in text
    code, text = _run(capsys, "train", "--config", str(config))
    assert code == 2 and "write `video_directory` for this folder instead of `image_directory`" in text


def test_train_before_caching_names_both_cache_commands(tmp_path, capsys, tiny_kit):
    _images(tmp_path / "photos", 2)
    config = _config(tmp_path, tiny_kit, {"image_directory": "photos", "cache_directory": "cache"})
    code, text = _run(capsys, "train", "--config", str(config))
    assert code == 2
    assert "wantrainer cache-latents" in text and "wantrainer cache-text" in text
    assert "2 without latent cache" in text and "2 without text cache" in text


def test_missing_caption_is_named_and_training_can_proceed(tmp_path, capsys, tiny_kit, caplog):
    folder = _images(tmp_path / "photos", 2)
    (folder / "img1.txt").unlink()
    config = _config(tmp_path, tiny_kit, {"image_directory": "photos"})
    with caplog.at_level(logging.WARNING, logger="wantrainer"):
        code, text = _run(capsys, "doctor", "--config", str(config))
    assert code == 0 and "captions missing: 1" in text
    assert str(folder / "img1.png") in caplog.text and "empty caption" in caplog.text
    assert f"write its caption in {folder / 'img1.txt'}" in caplog.text


@pytest.mark.parametrize("text, fragment", [
    ("learnig_rate = 1e-4\n", "did you mean `learning_rate`"),
    ('max_train_steps = "twelve"\n', "`max_train_steps` must be an integer"),
    ("network_dim = 8.5\n", "`network_dim` must be an integer"),
])
def test_config_mistakes_name_the_key(tmp_path, capsys, text, fragment):
    config = tmp_path / "my.toml"
    config.write_text(text, encoding="utf-8")
    for command in ("validate", "train"):
        code, out = _run(capsys, command, "--config", str(config))
        assert code == 2 and fragment in out


def test_missing_model_files_are_named(tmp_path, capsys, tiny_kit):
    _images(tmp_path / "photos", 1)
    config = _config(tmp_path, tiny_kit, {"image_directory": "photos"}, dit=str(tmp_path / "nope.safetensors"),
                     t5_tokenizer=str(tmp_path / "tokenizr"))
    code, text = _run(capsys, "validate", "--config", str(config))
    assert code == 2 and "`dit`" in text and "nope.safetensors does not exist" in text
    assert "`t5_tokenizer`" in text and "tokenizr does not exist" in text
    code, text = _run(capsys, "cache-text", "--config", str(config))
    assert code == 2 and "`t5_tokenizer` folder not found" in text


# --- progress output ---------------------------------------------------------------------------------------------


def test_progress_without_a_terminal_is_plain_lines():
    log = io.StringIO()  # not a terminal, like a redirected stderr
    bar = progress_bar(log, total=500, desc="steps", unit="step")
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 3 and all(line.startswith("steps:") for line in lines)  # start, (30 s), end
    assert "500/500" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_message_during_a_live_bar_gets_its_own_line():
    terminal = _Terminal()
    handler = _BarAwareHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    bar = progress_bar(terminal, total=3, desc="steps")
    bar.update(1)
    handler.emit(logging.LogRecord("wantrainer.x", logging.INFO, __file__, 1, "saved the LoRA", None, None))
    bar.update(1)
    bar.close()
    segments = [s.strip() for s in re.split(r"[\r\n]", terminal.getvalue())]
    assert "saved the LoRA" in segments  # not glued to the end of the bar


# --- the command line --------------------------------------------------------------------------------------------


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"wantrainer {__version__} (Python ")
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: wantrainer" in out and "cache-latents" in out and "Exit codes" in out


def test_every_command_and_option_is_described():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    assert set(subparsers) == {cmd.name for cmd in COMMANDS}
    for cmd in COMMANDS:
        sub = subparsers[cmd.name]
        assert cmd.description and len(sub.format_help()) > len(sub.format_usage()) + len(cmd.description)
        for action in sub._actions:
            assert action.help and action.help.strip(), (cmd.name, action.option_strings or action.dest)


def test_unknown_command_is_exit_2_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian", "--config", "x.toml"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


# --- Ctrl-C in a real process, then auto_resume ------------------------------------------------------------------


def _wantrainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "wantrainer.cli", *args]


@pytest.mark.slow
def test_ctrl_c_saves_state_and_auto_resume_finishes(train_workspace, tmp_path):
    values = train_workspace.config(tmp_path / "out", max_train_steps=1_000_000, save_every_n_steps=2)
    config = write_config(tmp_path / "my.toml", values)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_wantrainer("train", "--config", str(config)), stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    seen = []
    for line in proc.stderr:  # the first periodic save happens inside the loop, where Ctrl-C is handled
        seen.append(line)
        if "lora-step00000002.safetensors" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(seen) + rest  # interrupted by SIGINT after saving
    assert "Traceback" not in rest and "auto_resume = true" in rest
    stopped = int(re.search(r"interrupted at step (\d+)", rest).group(1))
    assert (tmp_path / "out" / f"lora-step{stopped:08d}-state" / "COMPLETE.json").is_file()

    values.update(max_train_steps=stopped + 2, auto_resume=True)
    write_config(config, values)
    done = subprocess.run(_wantrainer("train", "--config", str(config)), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"at step {stopped}" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "lora.safetensors").is_file()
