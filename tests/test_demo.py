"""`wantrainer demo` end to end: kit, synthetic data, caches, training, held-out loss, files."""

from __future__ import annotations

import pytest

from wantrainer.cli import main as cli_main
from wantrainer.devkit.demo import run_demo


@pytest.mark.slow
def test_demo_trains_and_reports(tmp_path):
    result = run_demo(tmp_path / "demo", steps=30)
    assert result.steps == 30
    assert result.drop > 0.07, (result.loss_before, result.loss_after)
    names = {p.relative_to(result.output_dir).as_posix() for p in result.files}
    assert {"demo_lora.safetensors", "demo_lora-step00000015.safetensors", "logs"} <= names
    assert any(n.startswith("sample/") and n.endswith(".mp4") for n in names)
    assert list(result.log_dir.glob("events.out.tfevents.*"))
    assert sorted(result.seconds) == ["cache", "prepare", "train"] and min(result.seconds.values()) > 0  # reported


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert cli_main(["demo", "--dir", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
