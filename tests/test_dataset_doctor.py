"""``wantrainer doctor``: the report, the plot and the exit code."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from wantrainer.cli import main
from wantrainer.devkit.synthetic import make_synthetic_dataset


def _config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def test_doctor_reports_problems_and_plots(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "media", seed=2, num_images=3, num_videos=2, video_frames=(17, 17),
                                  with_corrupt_image=True, with_truncated_video=True, with_short_video=True)
    (data.image_dir / "image_002.txt").unlink()
    config = _config(tmp_path / "cfg.toml", """
output_dir = "out"
[datasets.general]
resolution = 64
enable_bucket = true
[[datasets.train]]
image_directory = "media/images"
[[datasets.train]]
video_directory = "media/videos"
target_frames = [9, 17, 33]
""")
    assert main(["doctor", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "datasets.train[0]: images from" in text and "items: 3 from 3 file(s); unreadable or skipped: 1; captions missing: 1" in text
    assert "broken.png: unreadable image" in text and "image_002.png" in text
    assert "items: 4 from 2 file(s); unreadable or skipped: 2; captions missing: 0" in text
    assert "too short for 9 frames (1 video(s)):\n    short.mp4: 5 frames" in text
    assert "too short for 33 frames (3 video(s)):" in text and "clip_000.mp4: 17 frames" in text
    assert "truncated.mp4: unreadable video" in text
    assert "caches present: 0 of 4 latent, 0 of 2 text" in text
    frames_section = text.split("frame counts (window length: items):")[1]
    assert [line.split()[0] for line in frames_section.strip().splitlines()[:2]] == ["9", "17"]
    for index in (0, 1):
        plot = tmp_path / "out" / f"doctor_train_{index}.png"
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert text.rstrip().endswith("ok: 7 training item(s) ready to cache and train")


def test_doctor_exit_2_when_training_cannot_start(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    config = _config(tmp_path / "cfg.toml", """
[[datasets.train]]
image_directory = "empty"
[[datasets.val]]
image_directory = "missing"
""")
    assert main(["doctor", "--config", str(config)]) == 2
    text = capsys.readouterr().out
    assert "no training dataset holds a usable item" in text
    assert "datasets.val[0]" in text and "does not exist" in text


def test_doctor_bad_config_is_exit_2(tmp_path, capsys):
    config = _config(tmp_path / "cfg.toml", "[[datasets.train]]\nimage_directory = 'a'\nresolution = 'huge'\n")
    assert main(["doctor", "--config", str(config)]) == 2
    assert "datasets.train[0].resolution" in capsys.readouterr().err
