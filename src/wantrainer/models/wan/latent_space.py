"""Which VAE's latents a model type trains on: the Wan 2.1 VAE (16 channels, 8x spatial) for every Wan 2.1 model
and the Wan 2.2 A14B experts, the Wan 2.2 VAE (48 channels, 16x spatial) for TI2V-5B. Both compress time 4x
(4k+1 frames -> k+1 latent frames) and every DiT patchifies the latent grid by 2, so a pixel side must be a
multiple of ``2 x spatial_stride``: 16 px for the Wan 2.1 VAE, 32 px for the Wan 2.2 VAE. The models of each space
were trained at their own frame rate (``fps``): 16 for Wan 2.1 / Wan 2.2 A14B, 24 for the TI2V-5B; ``source_fps``
resamples clips to it and samples are written at it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentSpace:
    vae_type: str
    """"wan2.1" or "wan2.2": recorded in each latent cache (metadata ``vae_type``)."""
    channels: int
    spatial_stride: int
    label: str
    """How messages name the VAE."""
    fps: int = 16
    """Frame rate of the models that use this VAE."""

    @property
    def pixel_step(self) -> int:
        """Width / height multiple in pixels: VAE stride x DiT patch size 2."""
        return 2 * self.spatial_stride


WAN21_VAE = LatentSpace("wan2.1", 16, 8, "the Wan 2.1 VAE (16 channels, wan_2.1_vae.safetensors / Wan2.1_VAE.pth)")
WAN22_VAE = LatentSpace("wan2.2", 48, 16, "the Wan 2.2 VAE (48 channels, wan2.2_vae.safetensors / Wan2.2_VAE.pth)",
                        fps=24)
BY_VAE_TYPE = {space.vae_type: space for space in (WAN21_VAE, WAN22_VAE)}
BY_CHANNELS = {space.channels: space for space in (WAN21_VAE, WAN22_VAE)}


def latent_space(model_type: str) -> LatentSpace:
    """The latent space a model type trains and samples in (TI2V-5B: the Wan 2.2 VAE; every other: Wan 2.1)."""
    return WAN22_VAE if model_type == "ti2v" else WAN21_VAE
