"""A cached workspace for the image-to-video tests: synthetic clips and images encoded for the kit's I2V DiTs."""

from __future__ import annotations

from train_support import load, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text


class I2VWorkspace:
    """Synthetic clips (5-frame windows at 64 x 64) cached for the kit's I2V DiTs, one cache folder per type."""

    def __init__(self, root, kit):
        from wantrainer.devkit.synthetic import make_synthetic_dataset

        self.root, self.kit = root, kit
        media = make_synthetic_dataset(root / "media", seed=3, num_images=2, num_videos=2, video_frames=(9, 13))
        self.video_dir, self.image_dir = media.video_dir, media.image_dir
        self.val_dir = make_synthetic_dataset(root / "val", seed=4, num_images=0, num_videos=2,
                                              video_frames=(9, 13)).video_dir
        self.dits = {"i2v": kit.dit_wan21_i2v, "flf2v": kit.dit_wan21_flf2v, "i2v_a14b": kit.dit_wan22_i2v_low}
        for model_type in self.dits:
            cfg = load(write_config(root / f"encode_{model_type}.toml",
                                    self.config(model_type, root / "unused", val=True)))
            cache_latents(cfg)
            cache_text(cfg)

    def cache_dir(self, model_type, kind="video"):
        return self.root / f"cache_{model_type}_{kind}"

    def config(self, model_type, out_dir, *, val=False, **overrides):
        values = {
            "dit": str(self.dits[model_type]), "clip": str(self.kit.clip), "vae": str(self.kit.vae),
            "t5": str(self.kit.t5), "t5_tokenizer": str(self.kit.tokenizer_dir), "mixed_precision": "no",
            "max_train_steps": 3, "seed": 5, "network_dim": 4, "network_alpha": 4.0, "learning_rate": 2e-3,
            "lr_scheduler": "constant", "max_data_loader_n_workers": 0, "save_precision": "fp32",
            "timestep_sampling": "uniform", "output_dir": str(out_dir), "output_name": "lora",
            "datasets": {"train": [
                {"video_directory": str(self.video_dir), "cache_directory": str(self.cache_dir(model_type)),
                 "resolution": [64, 64], "batch_size": 2, "target_frames": [5]},
                {"image_directory": str(self.image_dir), "cache_directory": str(self.cache_dir(model_type, "image")),
                 "resolution": [64, 64], "batch_size": 2},
            ]},
        }  # fmt: skip
        if val:
            values["datasets"]["val"] = [
                {"video_directory": str(self.val_dir), "cache_directory": str(self.cache_dir(model_type, "val")),
                 "resolution": [64, 64], "batch_size": 2, "target_frames": [5]}]
        values.update(overrides)
        return values

    def write(self, model_type, folder, **overrides):
        return write_config(folder / "config.toml", self.config(model_type, folder / "out", **overrides))
