"""The CLIP vision encoder of Wan 2.1 I2V: the official ``.pth`` layout against a forward pass written from Wan's
``wan/modules/clip.py`` (VisionTransformer with ``use_31_block``), and the ComfyUI / diffusers layouts against
transformers' ``CLIPVisionModel`` penultimate hidden states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wantrainer.devkit.tiny_kit import TINY_CLIP, TINY_CLIP_TOKENS
from wantrainer.errors import UserError
from wantrainer.models.wan.clip_vision import CLIP_MEAN, CLIP_STD, WanCLIPVision, wan_to_hf

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _wan_reference_features(state: dict[str, torch.Tensor], frames: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's ``CLIPModel.visual`` + ``VisionTransformer.forward(use_31_block=True)`` on the official keys:
    pre-norm ViT, fused qkv, exact GELU MLP, every block but the last, no post-norm."""
    s = {k: v.float() for k, v in state.items() if k.startswith("visual.")}
    size = int((s["visual.pos_embedding"].shape[1] - 1) ** 0.5) * s["visual.patch_embedding.weight"].shape[-1]
    x = F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    patch = s["visual.patch_embedding.weight"]
    x = F.conv2d(x, patch, stride=patch.shape[-1]).flatten(2).permute(0, 2, 1)
    x = torch.cat([s["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + s["visual.pos_embedding"]
    dim = x.shape[-1]

    def norm(t, name):
        return F.layer_norm(t, (dim,), s[name + ".weight"], s[name + ".bias"], 1e-5)

    x = norm(x, "visual.pre_norm")
    blocks = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("visual.transformer."))
    for i in range(blocks - 1):
        p = f"visual.transformer.{i}."
        b, n = x.shape[:2]
        qkv = F.linear(norm(x, p + "norm1"), s[p + "attn.to_qkv.weight"], s[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(b, n, 3, heads, dim // heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(attn.transpose(1, 2).reshape(b, n, dim), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.gelu(F.linear(norm(x, p + "norm2"), s[p + "mlp.0.weight"], s[p + "mlp.0.bias"]))
        x = x + F.linear(h, s[p + "mlp.2.weight"], s[p + "mlp.2.bias"])
    return x


def _frames(seed=0, n=2, h=40, w=72):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_official_layout_matches_the_wan_reference(tiny_kit):
    state = torch.load(str(tiny_kit.clip), weights_only=True)
    clip = WanCLIPVision.load(tiny_kit.clip)
    frames = _frames()
    got = clip.encode(frames)
    want = _wan_reference_features(state, frames, heads=TINY_CLIP["num_attention_heads"])
    assert got.shape == (2, TINY_CLIP_TOKENS, TINY_CLIP["hidden_size"]) == want.shape
    assert (got - want).abs().max().item() < 1e-5
    assert want.abs().max().item() > 0.5
    # the two frames differ, and the last (unused) block really is not used
    assert (got[0] - got[1]).abs().max() > 1e-2
    assert clip.model.config.num_hidden_layers == TINY_CLIP["num_hidden_layers"] - 1


def _transformers_reference(hf_state, frames):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**TINY_CLIP, hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModel(config).eval()
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers >= 5 names its own keys
        hf_state = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    clip_input = WanCLIPVision(model, "cpu", torch.float32).preprocess(frames)
    with torch.no_grad():
        return model(pixel_values=clip_input, output_hidden_states=True).hidden_states[-2]


def test_comfyui_and_diffusers_layouts_match_transformers(tiny_kit, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    official = {k: v.float() for k, v in torch.load(str(tiny_kit.clip), weights_only=True).items()}
    hf_state = wan_to_hf(official)
    frames = _frames(seed=3, n=3)
    want = _transformers_reference(hf_state, frames)

    # ComfyUI clip_vision_h.safetensors: transformers keys with the projection
    comfy = dict(hf_state, **{"visual_projection.weight": official["visual.head"].t().contiguous()})
    save_file({k: v.to(torch.float16) for k, v in comfy.items()}, str(tmp_path / "clip_vision_h.safetensors"))
    # diffusers' image_encoder folder: CLIPVisionModelWithProjection.save_pretrained
    config = CLIPVisionConfig(**TINY_CLIP, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32)
    folder_model = CLIPVisionModelWithProjection(config)
    own = set(folder_model.state_dict())
    folder_model.load_state_dict({k if k in own else k.removeprefix("vision_model."): v for k, v in comfy.items()})
    folder_model.save_pretrained(str(tmp_path / "image_encoder"))

    for path, tol in ((tmp_path / "image_encoder", 1e-5), (tiny_kit.clip, 1e-5)):
        got = WanCLIPVision.load(path).encode(frames)
        assert (got - want).abs().max().item() < tol, path
    fp16_file = WanCLIPVision.load(tmp_path / "clip_vision_h.safetensors").encode(frames)  # weights stored in fp16
    assert (fp16_file - want).abs().max().item() < 5e-3
    assert want.abs().max().item() > 0.5


def test_wrong_files_are_clear_errors(tiny_kit, tmp_path):
    with pytest.raises(UserError, match="not a CLIP vision encoder.*text encoder"):
        WanCLIPVision.load(tiny_kit.t5)
    with pytest.raises(UserError, match="not found"):
        WanCLIPVision.load(tmp_path / "missing.pth")
    with pytest.raises(UserError, match="holds no .safetensors"):
        WanCLIPVision.load(tmp_path)
