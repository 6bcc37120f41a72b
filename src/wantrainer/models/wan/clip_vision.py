"""The CLIP vision encoder of Wan 2.1 I2V / FLF2V (open-clip XLM-RoBERTa ViT-H/14) as transformers' ``CLIPVisionModel``.

Wan feeds the DiT the hidden states after the penultimate transformer block (``use_31_block=True``: 31 of 32
blocks, no post-norm), [N, 257, 1280] at 224 px. We build ``CLIPVisionModel`` with one block fewer than the file
holds, so ``last_hidden_state`` is exactly those features and the unused last block is never loaded.

Layouts read:

- official Wan ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: ``visual.patch_embedding.weight``,
  ``visual.cls_embedding`` [1, 1, D], ``visual.pos_embedding`` [1, 257, D], ``visual.pre_norm``,
  ``visual.transformer.N.{norm1, attn.to_qkv (fused q|k|v), attn.proj, norm2, mlp.0, mlp.2}``, ``visual.post_norm``,
  ``visual.head``; the text tower (``textual.*``) and ``log_scale`` are ignored;
- transformers layout (ComfyUI's ``clip_vision_h.safetensors``, diffusers' ``image_encoder`` folder with its
  ``config.json``): ``vision_model.embeddings.*``, ``vision_model.pre_layrnorm``,
  ``vision_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``, ...

Preprocessing follows Wan's ``CLIPModel.visual``: frames in [-1, 1], bicubic resize to the model's square input
size (``align_corners=False``), then CLIP's mean / std.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from ...common.logger import get_logger
from ...errors import UserError
from .vae import read_weights

logger = get_logger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_HEADS = 16  # ViT-H/14: width 1280, 16 heads of 80; the files carry no head count
SMALL_HEAD_DIM = 32  # other widths (the tiny test kit): heads of 32
CLIP_HELP = (
    "download models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth from Wan-AI/Wan2.1-I2V-14B-480P, or ComfyUI's "
    "clip_vision_h.safetensors (Comfy-Org/Wan_2.1_ComfyUI_repackaged, split_files/clip_vision), or point `clip` at "
    "the image_encoder folder of a diffusers Wan I2V repository"
)

_BLOCK_KEYS = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
}  # fmt: skip
_TOP_KEYS = {
    "visual.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "vision_model.pre_layrnorm.weight",
    "visual.pre_norm.bias": "vision_model.pre_layrnorm.bias",
    "visual.post_norm.weight": "vision_model.post_layernorm.weight",
    "visual.post_norm.bias": "vision_model.post_layernorm.bias",
}


# ----------------------------------------------------------------------------------------------------------------
# 1. Key layouts
# ----------------------------------------------------------------------------------------------------------------


def wan_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan CLIP keys (vision tower) -> transformers ``CLIPVisionModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)", key)
        prefix = f"vision_model.encoder.layers.{block.group(1)}." if block else ""
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key == "visual.cls_embedding":
            out["vision_model.embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = value.reshape(-1, value.shape[-1])
        elif block and block.group(2) in _BLOCK_KEYS:
            out[prefix + _BLOCK_KEYS[block.group(2)]] = value
        elif block and block.group(2).startswith("attn.to_qkv."):
            kind = block.group(2).rsplit(".", 1)[1]  # weight [3D, D] / bias [3D]: q | k | v
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.clone()
    return out


def hf_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModel`` keys -> the official Wan vision-tower keys (the tiny kit writes these)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    blocks = {v: k for k, v in _BLOCK_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key in top:
            out[top[key]] = value
        elif key == "vision_model.embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif layer and layer.group(2) in blocks:
            out[f"visual.transformer.{layer.group(1)}.{blocks[layer.group(2)]}"] = value
        elif layer and (m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", layer.group(2))):
            qkv.setdefault((layer.group(1), m.group(2)), {})[m.group(1)] = value
    for (index, kind), parts in qkv.items():
        out[f"visual.transformer.{index}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_hf_layout(state: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """Any supported layout -> transformers keys (vision tower only)."""
    if "visual.transformer.0.attn.to_qkv.weight" in state:
        return wan_to_hf(state)
    if "vision_model.encoder.layers.0.self_attn.q_proj.weight" in state:
        return {k: v for k, v in state.items() if k.startswith("vision_model.")}
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in state:
        hint = "an open_clip layout; use Wan's .pth or ComfyUI's clip_vision_h.safetensors"
    elif any(k.startswith(("encoder.block.", "shared.", "blocks.0.attn")) for k in state):
        hint = "it looks like a text encoder"
    else:
        hint = "no CLIP vision tower keys (visual.transformer.* or vision_model.encoder.layers.*)"
    raise UserError(f"`clip` = {source} is not a CLIP vision encoder: {hint}; {CLIP_HELP}")


def infer_config(state: dict[str, torch.Tensor], file_config: dict | None = None) -> CLIPVisionConfig:
    """The architecture from the tensor shapes (a diffusers ``config.json`` gives the head count)."""
    hidden, _, patch, _ = state["vision_model.embeddings.patch_embedding.weight"].shape
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
    heads = (file_config or {}).get("num_attention_heads")
    if heads is None:
        heads = VIT_H_HEADS if hidden == 1280 else max(1, hidden // SMALL_HEAD_DIM)
    grid = round((positions - 1) ** 0.5)
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=heads, image_size=grid * patch, patch_size=patch,
        hidden_act=(file_config or {}).get("hidden_act", "gelu"),
        layer_norm_eps=(file_config or {}).get("layer_norm_eps", 1e-5),
    )  # fmt: skip


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, config.json or None) of a file or a diffusers / transformers folder."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise UserError(f"`clip` folder {path} holds no .safetensors / .bin weights; {CLIP_HELP}")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(read_weights(file, "CLIP vision encoder"))
        config = path / "config.json"
        return state, json.loads(config.read_text()) if config.is_file() else None
    if not path.exists():
        raise UserError(f"`clip` file not found: {path}; {CLIP_HELP}")
    return read_weights(path, "CLIP vision encoder"), None


def _model_keys(state: dict[str, torch.Tensor], model: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """File keys (``vision_model.*``) as the installed transformers names the module's own keys."""
    if any(k.startswith("vision_model.") for k in model.state_dict()):
        return state
    return {k.removeprefix("vision_model."): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------------------------
# 2. The wrapper
# ----------------------------------------------------------------------------------------------------------------


class WanCLIPVision:
    """``encode(frames [N, 3, H, W] in [-1, 1]) -> [N, tokens, width]`` penultimate-block features (float32)."""

    def __init__(self, model: CLIPVisionModel, device: torch.device | str, dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = model.config.image_size
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanCLIPVision:  # fmt: skip
        path = Path(path).expanduser()
        raw, file_config = _read(path)
        state = to_hf_layout(raw, path)
        config = infer_config(state, file_config)
        if config.num_hidden_layers < 2:
            raise UserError(f"`clip` = {path} has {config.num_hidden_layers} block(s); Wan uses the penultimate one")
        config.num_hidden_layers -= 1  # the penultimate block's output is last_hidden_state
        last = config.num_hidden_layers
        state = {k: v for k, v in state.items() if not k.startswith(f"vision_model.encoder.layers.{last}.")}
        with torch.device("meta"):
            model = CLIPVisionModel(config)
        state = _model_keys(state, model)
        expected = {k for k in model.state_dict() if "position_ids" not in k}
        missing = sorted(expected - set(state))
        if missing:
            raise UserError(f"`clip` = {path} lacks {len(missing)} tensors of the vision tower (e.g. {missing[0]})")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
        tower = getattr(model, "vision_model", model)  # transformers < 5 nests the tower
        tower.embeddings.register_buffer(
            "position_ids", torch.arange(tower.embeddings.num_positions).unsqueeze(0), persistent=False
        )
        model = model.to(device=device, dtype=dtype)
        logger.info("loaded CLIP vision %s (width %d, %d of %d blocks used, %d px, %s)", path.name,
                    config.hidden_size, last, last + 1, config.image_size, dtype)  # fmt: skip
        return cls(model, device, dtype)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def tokens(self) -> int:
        return (self.image_size // self.model.config.patch_size) ** 2 + 1

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> CLIP pixel values [N, 3, size, size] (float32)."""
        size = (self.image_size, self.image_size)
        x = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False)
        return (x * 0.5 + 0.5 - self.mean) / self.std

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"CLIP input must be [N, 3, H, W] frames, got {tuple(frames.shape)}")
        pixels = self.preprocess(frames.cpu()).to(self.device, self.dtype)
        return self.model(pixel_values=pixels).last_hidden_state.float()

    def to(self, device: str | torch.device) -> WanCLIPVision:
        self.model.to(device)
        self.device = torch.device(device)
        return self
