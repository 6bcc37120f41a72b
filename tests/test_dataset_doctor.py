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


def test_contact_sheet_fps_warning_and_general_value_once(tmp_path, capsys):
    import numpy as np

    from wantrainer.devkit.synthetic import write_mp4

    data = make_synthetic_dataset(tmp_path / "media", seed=3, num_images=4, num_videos=2, video_frames=(17, 17))
    frames = [np.full((48, 64, 3), (40 * i) % 255, dtype=np.uint8) for i in range(20)]
    write_mp4(data.video_dir / "fast.mp4", frames, fps=30)
    (data.video_dir / "fast.txt").write_text("a grey fade from dark to light, filmed at thirty frames", encoding="utf-8")
    config = _config(tmp_path / "cfg.toml", """
output_dir = "out"
[datasets.general]
resolution = [64, 48]
[[datasets.train]]
image_directory = "media/images"
[[datasets.train]]
video_directory = "media/videos"
target_frames = [9]
""")
    assert main(["doctor", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "WARNING: 1 video(s) are not 16 fps (30 fps, e.g. fast.mp4) and `source_fps` is unset" in text
    assert "set source_fps = 30 in datasets.train[1]" in text and "slow motion" in text
    for index, rows in ((0, 4), (1, 3)):
        sheet = tmp_path / "out" / f"doctor_train_{index}_sheet.png"
        assert f"contact sheet: {sheet}" in text
        with Image.open(sheet) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert image.width >= 150 and image.height >= 150 * min(rows, 3)
        assert pixels.std() > 20  # not blank: frames and text
    # the video sheet shows first / middle / last frames of each window: three panels a row, wider than tall
    with Image.open(tmp_path / "out" / "doctor_train_1_sheet.png") as image:
        assert image.width > 2 * 150
    # with source_fps set there is no warning
    config.write_text(config.read_text().replace("target_frames = [9]", "target_frames = [9]\nsource_fps = 16"))
    assert main(["doctor", "--config", str(config)]) == 0
    assert "not 16 fps" not in capsys.readouterr().out
    # a bad [datasets.general] value is reported once, where it was written
    config.write_text(config.read_text().replace("resolution = [64, 48]", "resolution = [70, 48]"))
    assert main(["doctor", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "1 problem in" in err and "`datasets.general.resolution`: resolution 70x48" in err


def test_contact_sheet_frames_are_the_cached_pixels(synthetic_media, tmp_path):
    """The sheet's frames come from the caching code: the same resize and crop as cache-latents."""
    import numpy as np

    from wantrainer.config_parser import parse_config
    from wantrainer.dataset.blueprint import resolve_datasets
    from wantrainer.dataset.contact_sheet import item_frames, sheet_items
    from wantrainer.dataset.sources import scan_dataset
    from wantrainer.sampling.writers import to_uint8_frames

    cfg = parse_config({"datasets": {"train": [{"video_directory": str(synthetic_media.video_dir),
                                                 "cache_directory": str(tmp_path), "resolution": [32, 32],
                                                 "target_frames": [9]}]}})
    scan = scan_dataset(next(iter(resolve_datasets(cfg.datasets, "train"))))
    rows = item_frames(sheet_items(scan.items))
    item, frames = rows[0]
    assert item.is_video and len(frames) == 3 and frames[0].shape == (32, 32, 3)
    from wantrainer.dataset.windows import window_pixels

    reference = to_uint8_frames(dict(window_pixels([item]))[item])
    assert np.array_equal(frames[0], reference[0]) and np.array_equal(frames[2], reference[-1])
    assert np.array_equal(frames[1], reference[reference.shape[0] // 2])
