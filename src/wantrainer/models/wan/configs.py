"""Architecture hyper-parameters of the Wan diffusion transformer and the released sizes."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Every released Wan DiT uses attention heads of width 128; checkpoints carry no head count.
HEAD_DIM = 128
# I2V / FLF2V input: 16 noisy latent channels + 4 mask channels + 16 conditioning-image latent channels.
I2V_CONDITION_CHANNELS = 20
CLIP_IMAGE_DIM = 1280  # ViT-H/14 hidden width
CLIP_IMAGE_TOKENS = 257  # 1 class token + 16 x 16 patches at 224 px

MODEL_TYPES: dict[str, str] = {
    "t2v": "text-to-video (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B experts)",
    "i2v": "image-to-video with the CLIP image branch (Wan 2.1 I2V 14B 480P / 720P)",
    "flf2v": "first-last-frame-to-video with the CLIP image branch (Wan 2.1 FLF2V 14B)",
    "i2v_a14b": "image-to-video without CLIP (Wan 2.2 I2V A14B experts)",
    "ti2v": "text-image-to-video on the Wan 2.2 VAE (Wan 2.2 TI2V 5B)",
}
"""The model variants, told apart by the checkpoint's shapes."""


@dataclass(frozen=True)
class WanModelConfig:
    """Shape of a Wan DiT. Everything except ``num_heads``, ``eps`` and ``text_len`` is visible in a checkpoint."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    image_dim: int | None = None
    """Width of the CLIP image features of the Wan 2.1 I2V / FLF2V image branch (1280); None: no image branch."""
    image_pos_len: int | None = None
    """FLF2V: image tokens of the learned position embedding ``img_emb.emb_pos`` (2 x 257); None otherwise."""

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        """One of ``MODEL_TYPES``: what the checkpoint's shapes say the model is."""
        if self.in_dim == self.out_dim == 48:
            return "ti2v"
        if self.in_dim == self.out_dim + I2V_CONDITION_CHANNELS:
            if self.image_dim is None:
                return "i2v_a14b"
            return "flf2v" if self.image_pos_len is not None else "i2v"
        return "t2v"

    @property
    def condition_channels(self) -> int:
        """Channels concatenated to the noisy latents (4 mask + 16 image latent for I2V / FLF2V, else 0)."""
        return self.in_dim - self.out_dim

    @property
    def clip_images(self) -> int:
        """How many CLIP-encoded frames the model takes: 2 for FLF2V, 1 for Wan 2.1 I2V, 0 otherwise."""
        if self.image_dim is None:
            return 0
        return 2 if self.image_pos_len is not None else 1

    def with_(self, **changes) -> WanModelConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


WAN_CONFIGS: dict[str, WanModelConfig] = {
    "wan21_t2v_1.3b": WanModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan21_t2v_14b": WanModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan22_t2v_a14b": WanModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan22_ti2v_5b": WanModelConfig(
        dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48
    ),
    "wan21_i2v_14b": WanModelConfig(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, image_dim=CLIP_IMAGE_DIM
    ),
    "wan21_flf2v_14b": WanModelConfig(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, image_dim=CLIP_IMAGE_DIM,
        image_pos_len=2 * CLIP_IMAGE_TOKENS,
    ),
    "wan22_i2v_a14b": WanModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
}
"""The released sizes (Wan 2.2 A14B T2V / I2V have two experts of the 14B shape)."""


def known_config_name(config: WanModelConfig) -> str | None:
    """The name of the released size this config matches (ignoring text_len / eps), or None."""
    for name, known in WAN_CONFIGS.items():
        if replace(config, eps=known.eps, text_len=known.text_len) == known:
            return name
    return None
