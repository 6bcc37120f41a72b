"""Shared pytest fixtures: tiny real models and synthetic media, built once per session."""

from __future__ import annotations

import os

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_media(tmp_path_factory):
    """A small clean synthetic set (4 images, 3 clips of 17-33 frames), built once per session. Read-only."""
    from wantrainer.devkit.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_media"), seed=0)


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    """The tiny model kit (3 DiTs, VAE, UMT5, tokenizer in the release layouts), built once per session. Read-only."""
    from wantrainer.devkit.tiny_kit import make_tiny_model_kit

    return make_tiny_model_kit(tmp_path_factory.mktemp("tiny_kit"), seed=0)


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory, tiny_kit):
    """Synthetic train (4 images) / val (3 images) sets cached by the kit's real VAE and UMT5. Read-only."""
    from train_support import TrainWorkspace

    return TrainWorkspace(tmp_path_factory.mktemp("train_workspace"), tiny_kit)


@pytest.fixture(scope="session")
def i2v_workspace(tmp_path_factory, tiny_kit):
    """Synthetic clips / images (train) and clips (val) cached for the kit's Wan 2.1 I2V, FLF2V and Wan 2.2 I2V
    DiTs, one cache folder per model type. Read-only."""
    from i2v_support import I2VWorkspace

    return I2VWorkspace(tmp_path_factory.mktemp("i2v_workspace"), tiny_kit)


@pytest.fixture()
def torch_one_thread():
    """Run the test with one intra-op thread (restored after). Small CPU models on a loaded 2-core machine run
    up to ~100x slower with 2 threads than with 1 (threads spin-waiting for a busy core)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ti2v_workspace(tmp_path_factory, tiny_kit):
    """Synthetic clips / images (train) and clips (val) cached by the kit's Wan 2.2 VAE for its TI2V-5B DiT."""
    from ti2v_support import TI2VWorkspace

    return TI2VWorkspace(tmp_path_factory.mktemp("ti2v_workspace"), tiny_kit)
