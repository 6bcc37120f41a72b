"""Shared sampling pieces: where the text encoder runs."""

from __future__ import annotations

import torch


def test_text_encoder_falls_back_to_the_cpu_when_the_gpu_is_full():
    from wantrainer.sampling.pipeline import GIB, text_encoder_device

    cuda = torch.device("cuda", 0)
    assert text_encoder_device(cuda, 11 * GIB, 40 * GIB) == cuda
    assert text_encoder_device(cuda, 11 * GIB, 12 * GIB) == torch.device("cpu")
    assert text_encoder_device(cuda, 11 * GIB, None) == cuda
    assert text_encoder_device("cpu", 11 * GIB, 0) == torch.device("cpu")
