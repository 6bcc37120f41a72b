"""Architecture hyper-parameters of the Wan diffusion transformer and the released sizes."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Every released Wan DiT uses attention heads of width 128; checkpoints carry no head count.
HEAD_DIM = 128


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

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

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
}
"""The released text-to-video sizes (Wan 2.2 A14B has two experts of the 14B shape)."""


def known_config_name(config: WanModelConfig) -> str | None:
    """The name of the released size this config matches (ignoring text_len / eps), or None."""
    for name, known in WAN_CONFIGS.items():
        if replace(config, eps=known.eps, text_len=known.text_len) == known:
            return name
    return None
