"""Helpers for the trainer tests: a cached workspace (tiny kit + synthetic media encoded by the real tiny VAE
and UMT5) and a config writer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from wantrainer.config.toml_writer import dump_toml
from wantrainer.config_parser import load_config
from wantrainer.dataset.blueprint import resolve_datasets
from wantrainer.dataset.cache_format import save_latent_cache, save_text_cache
from wantrainer.dataset.sources import scan_dataset


def encode_caches(cfg: Any, kit: Any) -> int:
    """Encode every train / val item of ``cfg`` with the kit's VAE and UMT5 (fp32, CPU); returns the count."""
    from wantrainer.models.wan.text_encoder import WanTextEncoder
    from wantrainer.models.wan.vae import WanVAE

    vae = WanVAE.load(kit.vae)
    te = WanTextEncoder.load(kit.t5, kit.tokenizer_dir)
    count = 0
    for split in ("train", "val"):
        for spec in resolve_datasets(cfg.datasets, split):
            for item in scan_dataset(spec).items:
                if not item.latent_cache_path.is_file():
                    latents = vae.encode(item.load_pixels().unsqueeze(0))[0].float()
                    width, height = item.bucket
                    save_latent_cache(item.latent_cache_path, latents, width, height, item.frames)
                if not item.text_cache_path.is_file():
                    save_text_cache(item.text_cache_path, te.encode([item.caption])[0].float())
                count += 1
    return count


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
        cfg_path = write_config(root / "encode.toml", self.config(root / "unused", val=True))
        encode_caches(load_config(cfg_path), kit)

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
