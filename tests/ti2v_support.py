"""A cached workspace for the TI2V-5B tests: synthetic clips and images encoded by the kit's Wan 2.2 VAE."""

from __future__ import annotations

from train_support import load, write_config
from wantrainer.caching.cache_latents import cache_latents
from wantrainer.caching.cache_text_encoder_outputs import cache_text

RESOLUTION = [64, 64]  # a multiple of 32: latents 4 x 4, 2 x 2 tokens per latent frame
FRAMES = 9  # 3 latent frames: the conditioning frame and two more


class TI2VWorkspace:
    """Synthetic clips (9-frame windows) and images at 64 x 64 cached for the kit's TI2V-5B DiT."""

    def __init__(self, root, kit):
        from wantrainer.devkit.synthetic import make_synthetic_dataset

        self.root, self.kit = root, kit
        media = make_synthetic_dataset(root / "media", seed=6, num_images=2, num_videos=4, video_frames=(9, 13))
        self.video_dir, self.image_dir = media.video_dir, media.image_dir
        self.val_dir = make_synthetic_dataset(root / "val", seed=7, num_images=0, num_videos=2,
                                              video_frames=(9, 13)).video_dir
        cfg = load(write_config(root / "encode.toml", self.config(root / "unused", val=True, images=True)))
        self.summary = cache_latents(cfg)
        cache_text(cfg)

    def cache_dir(self, kind="video"):
        return self.root / f"cache_{kind}"

    def config(self, out_dir, *, val=False, images=False, **overrides):
        train = [{"video_directory": str(self.video_dir), "cache_directory": str(self.cache_dir()),
                  "resolution": RESOLUTION, "batch_size": 3, "target_frames": [FRAMES]}]
        if images:
            train.append({"image_directory": str(self.image_dir), "cache_directory": str(self.cache_dir("image")),
                          "resolution": RESOLUTION, "batch_size": 2})
        values = {
            "target_model": "wan22", "dit": str(self.kit.dit_wan22_ti2v), "vae": str(self.kit.vae22),
            "t5": str(self.kit.t5), "t5_tokenizer": str(self.kit.tokenizer_dir), "mixed_precision": "no",
            "max_train_steps": 3, "seed": 5, "network_dim": 4, "network_alpha": 4.0, "learning_rate": 2e-3,
            "lr_scheduler": "constant", "max_data_loader_n_workers": 0, "save_precision": "fp32",
            "timestep_sampling": "uniform", "output_dir": str(out_dir), "output_name": "lora",
            "datasets": {"train": train},
        }  # fmt: skip
        if val:
            values["datasets"]["val"] = [
                {"video_directory": str(self.val_dir), "cache_directory": str(self.cache_dir("val")),
                 "resolution": RESOLUTION, "batch_size": 2, "target_frames": [FRAMES]}]
        values.update(overrides)
        return values

    def write(self, folder, **overrides):
        return write_config(folder / "config.toml", self.config(folder / "out", **overrides))
