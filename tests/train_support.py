"""Helpers for the trainer tests: a cached workspace (tiny kit + synthetic media encoded by the real tiny VAE
and UMT5) and a config writer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text
from wantrainer.config.toml_writer import dump_toml
from wantrainer.config_parser import load_config


def write_config(path: Path, values: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(values), encoding="utf-8")
    return path


def base_config(kit: Any, media_dir: Path, cache_dir: Path, out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small CPU fp32 run on the kit's Wan 2.1 DiT."""
    values: dict[str, Any] = {
        "dit": str(kit.dit_wan21),
        "mixed_precision": "no",
        "max_train_steps": 4,
        "seed": 7,
        "network_dim": 4,
        "network_alpha": 4.0,
        "learning_rate": 2e-3,
        "lr_scheduler": "constant",
        "max_data_loader_n_workers": 0,
        "save_precision": "fp32",
        "timestep_sampling": "uniform",
        "output_dir": str(out_dir),
        "output_name": "lora",
        "datasets": {
            "train": [
                {"image_directory": str(media_dir), "cache_directory": str(cache_dir), "resolution": [64, 64],
                 "batch_size": 2}
            ]
        },
    }
    datasets = overrides.pop("datasets", None)
    values.update(overrides)
    if datasets is not None:
        values["datasets"] = datasets
    return values


def train_command(workspace: Any, tmp_path: Path, name: str, **overrides: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``wantrainer train`` in a process of its own on ``workspace`` (output ``tmp_path / o_<name>``): its stderr
    and the LoRA it saved; asserts exit 0."""
    values = workspace.config(tmp_path / f"o_{name}", log_with="none", **overrides)
    config = write_config(tmp_path / f"c_{name}.toml", values)
    done = subprocess.run([sys.executable, "-m", "wantrainer.cli", "train", "--config", str(config)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr, lora_tensors(tmp_path / f"o_{name}" / "lora.safetensors")


def load(path: Path):
    return load_config(path)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class TrainWorkspace:
    """Cached train / val sets shared by the trainer tests (read-only; each test writes its own output_dir)."""

    def __init__(self, root: Path, kit: Any):
        from wantrainer.devkit.synthetic import make_synthetic_dataset

        self.root = root
        self.kit = kit
        self.train_media = make_synthetic_dataset(root / "train_media", seed=0, num_images=4, num_videos=0).image_dir
        self.val_media = make_synthetic_dataset(root / "val_media", seed=1, num_images=3, num_videos=0).image_dir
        self.train_cache = root / "train_cache"
        self.val_cache = root / "val_cache"
        encoders = {"vae": str(kit.vae), "t5": str(kit.t5), "t5_tokenizer": str(kit.tokenizer_dir)}
        cfg_path = write_config(root / "encode.toml", self.config(root / "unused", val=True, **encoders))
        cfg = load_config(cfg_path)
        cache_latents(cfg)  # the real caching commands' code, with the kit's VAE and UMT5 (fp32 on the CPU)
        cache_text(cfg)

    def config(self, out_dir: Path, *, val: bool = False, **overrides: Any) -> dict[str, Any]:
        values = base_config(self.kit, self.train_media, self.train_cache, out_dir, **overrides)
        if val:
            values["datasets"]["val"] = [
                {"image_directory": str(self.val_media), "cache_directory": str(self.val_cache),
                 "resolution": [64, 64], "batch_size": 3}
            ]
        return values

    def write(self, tmp: Path, *, val: bool = False, **overrides: Any) -> Path:
        return write_config(tmp / "config.toml", self.config(tmp / "out", val=val, **overrides))
