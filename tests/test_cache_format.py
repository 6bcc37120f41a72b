"""Cache files as musubi-tuner writes them (dataset/cache_io.py: save_latent_cache_wan,
save_text_encoder_output_cache_wan; dtype strings from ``str(dtype).split(".")[-1]``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wantrainer.dataset.cache_format import (
    AmbiguousCacheError,
    check_text_cache,
    latent_tensor_key,
    load_latent_cache,
    load_text_cache,
    read_latent_shape,
    text_tensor_key,
)

MUSUBI_LATENT_METADATA = {"architecture": "wan", "width": "832", "height": "480", "format_version": "1.0.1"}


def test_dtype_strings_are_musubis():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        name = str(dtype).split(".")[-1]
        assert latent_tensor_key(torch.zeros(16, 3, 60, 104, dtype=dtype)) == f"latents_3x60x104_{name}"
        assert text_tensor_key(torch.zeros(7, 4096, dtype=dtype)) == f"varlen_t5_{name}"


def test_an_image_to_video_cache_of_musubi_gives_its_video_latents(tmp_path):
    latents = torch.randn(16, 3, 6, 8).to(torch.bfloat16)
    path = tmp_path / "clip_00000-009_0832x0480_wan.safetensors"
    save_file(
        {
            "latents_3x6x8_bfloat16": latents,
            "clip_bfloat16": torch.randn(257, 1280).to(torch.bfloat16),
            "latents_image_3x6x8_bfloat16": torch.randn(20, 3, 6, 8).to(torch.bfloat16),
            "latents_control_3x6x8_bfloat16": torch.randn(16, 3, 6, 8).to(torch.bfloat16),
        },
        str(path),
        metadata={**MUSUBI_LATENT_METADATA, "frame_count": "9"},
    )
    loaded, metadata = load_latent_cache(path)
    assert torch.equal(loaded, latents)
    assert metadata["frame_count"] == "9"
    assert read_latent_shape(path) == (3, 6, 8)


def test_a_musubi_text_cache_is_read(tmp_path):
    embeds = torch.randn(11, 4096).to(torch.bfloat16)
    path = tmp_path / "clip_wan_te.safetensors"
    save_file({"varlen_t5_bfloat16": embeds}, str(path),
              metadata={"architecture": "wan", "caption1": "a cat", "format_version": "1.0.1"})  # fmt: skip
    assert torch.equal(load_text_cache(path), embeds)


def test_a_cache_recached_in_another_dtype_is_ambiguous(tmp_path):
    """musubi keeps a file's tensors when it re-caches it: two dtypes of the same latents / embeddings remain."""
    latent = tmp_path / "image_0064x0064_wan.safetensors"
    save_file({"latents_1x8x8_bfloat16": torch.zeros(16, 1, 8, 8, dtype=torch.bfloat16),
               "latents_1x8x8_float16": torch.zeros(16, 1, 8, 8, dtype=torch.float16)}, str(latent),
              metadata=MUSUBI_LATENT_METADATA)
    text = tmp_path / "image_wan_te.safetensors"
    save_file({"varlen_t5_bfloat16": torch.zeros(5, 8, dtype=torch.bfloat16),
               "varlen_t5_float32": torch.zeros(5, 8)}, str(text))
    for call in (read_latent_shape, load_latent_cache):
        with pytest.raises(AmbiguousCacheError, match=r"image_0064x0064_wan.safetensors holds 2 latents"):
            call(latent)
    for call in (check_text_cache, load_text_cache):
        with pytest.raises(AmbiguousCacheError, match=r"image_wan_te.safetensors holds 2 varlen_t5_\* tensors"):
            call(text)
