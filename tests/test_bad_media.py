"""Bad media never stops a command: decompression bombs, every Pillow mode (scaled, not clipped), broken links,
truncated JPEGs found by doctor as caching finds them, and over-long captions."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wantrainer.cli import main
from wantrainer.dataset.media import load_image, pixel_limit_text, probe_image, to_rgb
from wantrainer.errors import MediaError

H, W = 48, 64


def _png(path: Path, width: int, height: int, color_type: int, bit_depth: int, raw_rows: bytes) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows))
                     + chunk(b"IEND", b""))
    return path


def _gray() -> np.ndarray:
    return (np.add.outer(np.arange(H) * 2, np.arange(W) * 3) % 256).astype(np.uint8)


def _color() -> np.ndarray:
    g = _gray()
    return np.stack([g, 255 - g, (g // 4) * 4], axis=-1)


def test_a_decompression_bomb_is_skipped_with_the_pixel_limit(tmp_path):
    bomb = _png(tmp_path / "bomb.png", 100_000, 100_000, 0, 8, b"\0" * 100)
    with pytest.raises(MediaError, match="too large to decode safely") as info:
        probe_image(bomb)
    assert pixel_limit_text() in str(info.value)
    with pytest.raises(MediaError, match="too large"):
        load_image(bomb)


def test_doctor_and_cache_latents_skip_a_bomb_without_traceback(tmp_path, tiny_kit, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_color()).save(images / "good.png")
    _png(images / "bomb.png", 100_000, 100_000, 0, 8, b"\0" * 100)
    config = tmp_path / "c.toml"
    config.write_text(f'vae = "{tiny_kit.vae}"\noutput_dir = "out"\n[datasets.general]\nresolution = 32\n'
                      '[[datasets.train]]\nimage_directory = "images"\ncache_directory = "cache"\n')
    assert main(["doctor", "--config", str(config)]) == 0
    assert "bomb.png: image too large to decode safely" in capsys.readouterr().out
    assert main(["cache-latents", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["good_0064x0048_wan.safetensors"]


def _mode_cases(tmp_path: Path) -> dict[str, tuple[Image.Image | Path, np.ndarray]]:
    """mode -> (an image or file in that mode, the 8-bit RGB picture it holds)."""
    g, c = _gray(), _color()
    gray_rgb = np.repeat(g[..., None], 3, axis=-1)
    bilevel = np.where(g > 127, 255, 0).astype(np.uint8)
    few = (c // 64) * 64  # <= 64 colours, exact in a palette
    rgb16 = (c.astype(">u2") * 257).reshape(H, W * 3)
    raw16 = b"".join(b"\0" + row.tobytes() for row in rgb16)
    cases: dict[str, tuple[Image.Image | Path, np.ndarray]] = {
        "1": (Image.fromarray(bilevel).convert("1"), np.repeat(bilevel[..., None], 3, axis=-1)),
        "L": (Image.fromarray(g), gray_rgb),
        "LA": (Image.fromarray(np.stack([g, np.full_like(g, 255)], -1), mode="LA"), gray_rgb),
        "P": (Image.fromarray(few).quantize(colors=64, method=Image.Quantize.MAXCOVERAGE), few),
        "PA": (Image.fromarray(few).quantize(colors=64, method=Image.Quantize.MAXCOVERAGE).convert("PA"), few),
        "I;16": (Image.fromarray(g.astype(np.uint16) * 257), gray_rgb),
        "I": (Image.fromarray(g.astype(np.int32) * 257), gray_rgb),
        "F": (Image.fromarray(g.astype(np.float32) / 255.0), gray_rgb),
        "RGB": (Image.fromarray(c), c),
        "RGBA": (Image.fromarray(np.concatenate([c, np.full((H, W, 1), 255, np.uint8)], -1)), c),
        "CMYK": (Image.fromarray(c).convert("CMYK"), c),
        "YCbCr": (Image.fromarray(c).convert("YCbCr"), c),
        "16-bit RGB": (_png(tmp_path / "rgb16.png", W, H, 2, 16, raw16), c),
    }
    return cases


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "I;16", "I", "F", "RGB", "RGBA", "CMYK", "YCbCr",
                                  "16-bit RGB"])
def test_every_pillow_mode_loads_as_the_8_bit_picture_it_holds(tmp_path, mode):
    source, expected = _mode_cases(tmp_path)[mode]
    if isinstance(source, Path):
        loaded = load_image(source)
    else:
        assert source.mode == mode
        loaded = to_rgb(source)
        if mode in ("1", "L", "LA", "P", "I;16", "RGB", "RGBA"):  # the modes a PNG file can hold
            source.save(tmp_path / "m.png")
            on_disk = load_image(tmp_path / "m.png")
            assert np.array_equal(np.asarray(on_disk), np.asarray(loaded)), "file and memory differ"
    got = np.asarray(loaded).astype(int)
    assert loaded.mode == "RGB" and got.shape == expected.shape
    # YCbCr: Pillow's own RGB -> YCbCr -> RGB round trip is off by up to 3
    tolerance = 3 if mode == "YCbCr" else 1 if mode in ("I", "F") else 0
    assert np.abs(got - expected).max() <= tolerance, f"{mode}: max diff {np.abs(got - expected).max()}"


def test_a_16_bit_grayscale_png_is_not_white(tmp_path):
    Image.fromarray(_gray().astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png")).mean() == pytest.approx(_gray().mean(), abs=1)


def test_broken_links_are_reported_and_truncated_jpegs_found_by_doctor(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_color()).save(images / "good.png")
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    Image.fromarray(_color()).save(tmp_path / "full.jpg", quality=95)
    full = (tmp_path / "full.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(full[: len(full) * 2 // 3])
    probe_image(images / "cut.jpg")  # the header alone passes: this is what doctor used to check
    config = tmp_path / "c.toml"
    config.write_text('output_dir = "out"\n[datasets.general]\nresolution = 32\n'
                      '[[datasets.train]]\nimage_directory = "images"\n')
    assert main(["doctor", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "gone.png: broken symbolic link" in text and str(tmp_path / "nowhere.png") in text
    assert "cut.jpg: unreadable image" in text and "truncated" in text
    assert "items: 1 from" in text


def test_a_caption_over_512_tokens_is_warned_with_its_count(tmp_path, tiny_kit, caplog):
    from train_support import write_config
    from wantrainer.caching.cache_text_encoder_outputs import cache_text
    from wantrainer.config_parser import load_config

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_color()).save(images / "long.png")
    (images / "long.txt").write_text(" ".join(["a red square on a blue field"] * 120))
    Image.fromarray(_color()).save(images / "short.png")
    (images / "short.txt").write_text("a red square")
    cfg = load_config(write_config(tmp_path / "c.toml", {
        "t5": str(tiny_kit.t5), "t5_tokenizer": str(tiny_kit.tokenizer_dir),
        "datasets": {"train": [{"image_directory": str(images), "cache_directory": str(tmp_path / "cache"),
                                "resolution": [32, 32]}]}}))
    with caplog.at_level("WARNING", logger="wantrainer"):
        cache_text(cfg)
    warnings = [r.getMessage() for r in caplog.records if "tokens" in r.getMessage()]
    assert len(warnings) == 1 and "long_wan_te" in warnings[0] and "reads only the first 512" in warnings[0]
    assert int(warnings[0].split("caption has ")[1].split()[0]) > 512
