"""The Wan 2.1 VAE (and the Wan 2.2 VAE of TI2V-5B, see ``vae22.py``): original checkpoint layout -> diffusers
``AutoencoderKLWan``, with Wan's latent normalisation.

Accepted files: ComfyUI's ``wan_2.1_vae.safetensors`` and the official ``Wan2.1_VAE.pth`` (original key layout,
``encoder.conv1.weight``, ``encoder.downsamples.N.residual.M``, ``decoder.upsamples.N``, ...), or a diffusers-layout
safetensors. The base width (96 for the released VAE) is read from the weights, so a tiny test VAE takes the same path.

``encode`` returns ``(mu - mean) / std`` per channel (Wan's 16 standard values); ``decode`` inverts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ...common.logger import get_logger
from ...errors import UserError

logger = get_logger(__name__)

LATENT_CHANNELS = 16
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8
_STRIP_PREFIXES = ("first_stage_model.", "vae.", "model.")


# ----------------------------------------------------------------------------------------------------------------
# 1. Reading weights
# ----------------------------------------------------------------------------------------------------------------


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` state dict (the latter with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = _torch_load(path)
    except Exception as exc:  # corrupt or truncated file: tell the user which one
        raise UserError(f"cannot read the {what} file {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a plain state dict of tensors ({what})")
    return state


def _torch_load(path: Path):
    """``torch.load`` memory-mapped (zip-format files), falling back to a plain read for legacy-format files."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------------
# 2. Key layouts
# ----------------------------------------------------------------------------------------------------------------


def is_original_layout(state: dict[str, torch.Tensor]) -> bool:
    return "encoder.conv1.weight" in state and "decoder.conv1.weight" in state


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys -> diffusers keys (diffusers' own converter, fed a copy because it may pop keys)."""
    return convert_wan_vae_to_diffusers(dict(state))


_RESNET_TO_ORIGINAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}


def _diffusers_key_to_original(key: str, num_res_blocks: int) -> str:
    fixed = {
        "quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
        "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias",
    }
    if key in fixed:
        return fixed[key]
    part, rest = key.split(".", 1)  # "encoder" / "decoder"
    for name, original in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(name):
            return f"{part}.{original}{rest[len(name):]}"
    tokens = rest.split(".")
    if tokens[0] == "mid_block":  # mid_block.resnets.i / attentions.0 -> middle.{0,2} / middle.1
        index = 1 if tokens[1] == "attentions" else 2 * int(tokens[2])
        tail = ".".join(tokens[3:])
        if tokens[1] == "resnets":
            tail = _RESNET_TO_ORIGINAL[tail]
        return f"{part}.middle.{index}.{tail}"
    if tokens[0] == "down_blocks":  # flat list, same indices
        tail = ".".join(tokens[2:])
        return f"{part}.downsamples.{tokens[1]}.{_RESNET_TO_ORIGINAL.get(tail, tail)}"
    if tokens[0] == "up_blocks":  # up_blocks.i.resnets.j / upsamplers.0 -> upsamples.{i*(n+2)+j}
        stride = num_res_blocks + 2
        block, kind, sub = int(tokens[1]), tokens[2], int(tokens[3])
        tail = ".".join(tokens[4:])
        if kind == "resnets":
            return f"{part}.upsamples.{block * stride + sub}.{_RESNET_TO_ORIGINAL[tail]}"
        return f"{part}.upsamples.{block * stride + num_res_blocks + 1}.{tail}"
    raise ValueError(f"unmapped diffusers Wan VAE key: {key}")


def diffusers_to_original(state: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """diffusers keys -> original Wan keys: the inverse of diffusers' converter, checked by a round trip."""
    original = {_diffusers_key_to_original(k, num_res_blocks): v for k, v in state.items()}
    back = original_to_diffusers(original)
    if set(back) != set(state) or any(back[k] is not state[k] for k in state):
        raise AssertionError("the original-layout key map does not round-trip through diffusers' converter")
    return original


# ----------------------------------------------------------------------------------------------------------------
# 3. The causal-conv feature cache kept on the CPU
# ----------------------------------------------------------------------------------------------------------------


class _CpuFeatureCache(list):
    """A list of cached frames (one slot per causal conv) stored on the CPU and handed back on ``device``."""

    def __init__(self, slots: Iterable, device: torch.device):
        super().__init__(slots)
        self.device = device

    def __setitem__(self, index, value):  # type: ignore[override]
        if isinstance(value, torch.Tensor):
            value = value.to("cpu", non_blocking=False)
        super().__setitem__(index, value)

    def __getitem__(self, index):  # type: ignore[override]
        value = super().__getitem__(index)
        return value.to(self.device) if isinstance(value, torch.Tensor) else value


class WanAutoencoder(AutoencoderKLWan):
    """diffusers' ``AutoencoderKLWan``; with ``cache_on_cpu`` its causal-conv feature cache lives on the CPU.

    Between temporal chunks the encoder / decoder keep the last frames of every causal conv's input; normally on
    the GPU. With ``cache_on_cpu`` each slot is moved to the CPU when stored and back when read, trading transfer
    time for VRAM (the same trade as the original ``cache_device`` option).
    """

    cache_on_cpu: bool = False

    def clear_cache(self):
        super().clear_cache()
        if self.cache_on_cpu:
            device = next(self.parameters()).device
            self._feat_map = _CpuFeatureCache(self._feat_map, device)
            self._enc_feat_map = _CpuFeatureCache(self._enc_feat_map, device)


# ----------------------------------------------------------------------------------------------------------------
# 4. The wrapper
# ----------------------------------------------------------------------------------------------------------------


def vae_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """``base_dim``, ``decoder_base_dim`` and ``z_dim`` read from diffusers-layout weights (the whole Wan 2.2
    configuration for a Wan 2.2 VAE)."""
    from . import vae22

    if vae22.is_wan22_diffusers(state):
        return vae22.diffusers_config(state)
    try:
        base_dim = state["encoder.conv_in.weight"].shape[0]
        decoder_base_dim = state["decoder.conv_out.weight"].shape[1]
        z_dim = state["post_quant_conv.weight"].shape[0]
    except KeyError as exc:
        raise UserError(f"not a Wan VAE checkpoint: missing {exc}") from None
    if z_dim != LATENT_CHANNELS:
        raise UserError(
            f"this VAE has {z_dim} latent channels and is neither the Wan 2.1 VAE (16) nor the Wan 2.2 VAE (48)"
        )
    return {"base_dim": base_dim, "decoder_base_dim": decoder_base_dim, "z_dim": z_dim}


def build_autoencoder(state: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> WanAutoencoder:
    """diffusers-layout weights -> a ``WanAutoencoder`` holding exactly those tensors."""
    config = vae_config_from_state_dict(state)
    with torch.device("meta"):
        model = WanAutoencoder(**config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path} is not a Wan 2.1 / 2.2 VAE checkpoint: {exc}") from None
    return model.eval().requires_grad_(False)


class WanVAE:
    """Encode pixels in [-1, 1] (``[B, 3, F, H, W]``, F = 4k+1) to normalised latents and back."""

    def __init__(self, model: WanAutoencoder, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype
        self.mean = torch.tensor(model.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(model.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_cpu: bool = False,
        tiling: bool = False,
    ) -> WanVAE:
        from . import vae22

        state = _strip_prefix(read_weights(path, "VAE"))
        if vae22.is_wan22_layout(state):
            state = vae22.original_to_diffusers(state)
        elif is_original_layout(state):
            state = original_to_diffusers(state)
        elif "encoder.conv_in.weight" not in state:
            raise UserError(f"{path} is not a Wan VAE checkpoint (no encoder.conv1 / encoder.conv_in weights)")
        model = build_autoencoder({k: v.to(dtype) for k, v in state.items()}, path).to(device)
        model.cache_on_cpu = cache_cpu
        if tiling:
            model.enable_tiling()
        logger.info("loaded Wan %s VAE %s (base width %d, %d latent channels, %s)",
                    "2.2" if model.config.is_residual else "2.1", Path(path).name, model.config.base_dim,
                    model.config.z_dim, dtype)  # fmt: skip
        return cls(model, torch.device(device), dtype)

    def to(self, device: str | torch.device) -> WanVAE:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @property
    def latent_channels(self) -> int:
        return self.model.config.z_dim

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell in height / width: 8 (Wan 2.1 VAE) or 16 (Wan 2.2 VAE)."""
        return self.model.config.scale_factor_spatial

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> ``[B, C, (F-1)//4+1, H/s, W/s]`` normalised, in the VAE dtype
        (C, s = 16, 8 for the Wan 2.1 VAE, 48, 16 for the Wan 2.2 VAE)."""
        _check_pixels(pixels, self.spatial_stride)
        mu = self.model.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        latents = (mu.float() - self.mean.to(mu.device)) * self.inv_std.to(mu.device)
        return latents.to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, f, h, w]`` -> pixels ``[B, 3, 4(f-1)+1, s*h, s*w]`` in [-1, 1], float32."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, F, H, W], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        z = z / self.inv_std.to(z.device) + self.mean.to(z.device)
        return self.model.decode(z.to(self.dtype)).sample.float()


def _check_pixels(pixels: torch.Tensor, stride: int = SPATIAL_STRIDE) -> None:
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, F, H, W], got {tuple(pixels.shape)}")
    frames, height, width = pixels.shape[2:]
    if (frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"the Wan VAE needs 4k+1 frames, got {frames}")
    if height % stride or width % stride:
        raise ValueError(f"height and width must be multiples of {stride}, got {height}x{width}")


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Shape of one item's latents for ``frames`` x ``height`` x ``width`` pixels."""
    return (LATENT_CHANNELS, (frames - 1) // TEMPORAL_STRIDE + 1, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE)
