"""wantrainer: LoRA training for the Wan 2.1 / Wan 2.2 text-to-video diffusion transformers."""

__version__ = "0.1.0"
