"""A tiny but real Wan model kit, written in the release checkpoint layouts, for tests and the demo.

Deterministic from ``seed``, built in seconds, a few MB:

- ``dit_wan21.safetensors``, ``dit_wan22_high_noise.safetensors``, ``dit_wan22_low_noise.safetensors``: 2-layer
  Wan DiTs (dim 128, one head of 128, ffn 256, text_dim 64), ComfyUI layout (``model.diffusion_model.`` prefix), bf16;
- the same size as image-to-video variants: ``dit_wan21_i2v.safetensors`` (36 input channels, the CLIP image
  branch on the tiny CLIP's 64-wide features), ``dit_wan21_flf2v.safetensors`` (plus ``img_emb.emb_pos`` for
  2 x 17 image tokens), ``dit_wan22_i2v_{high,low}_noise.safetensors`` (36 input channels, no CLIP branch) and
  ``dit_wan22_ti2v.safetensors`` (48 latent channels in and out, the TI2V-5B layout);
- ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: a 3-block CLIP vision tower (width 64, 56 px,
  patch 14: 17 tokens) in the official Wan ``.pth`` layout (with a stub text tower, which loaders ignore);
- ``wan2.2_vae.safetensors``: a Wan 2.2 VAE (48 channels, 16x spatial; base width 16) in the original layout, bf16;
- ``wan_2.1_vae.safetensors``: a Wan 2.1 VAE of base width 16 in the original key layout, bf16;
- ``models_t5_umt5-xxl-enc-bf16.pth``: a 2-layer UMT5 encoder (d_model 64) in the official Wan ``.pth`` layout;
- ``tokenizer/spiece.model``: a sentencepiece unigram model trained offline on a built-in caption corpus;
- ``dinov2_tiny/``: a 2-layer DINOv2 image encoder (width 32, patch 14) as transformers writes a hub folder
  (``config.json`` + ``model.safetensors``, float16), the local encoder of REPA.

Every file is loaded by exactly the code that loads the released files.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.wan.configs import WanModelConfig

TINY_DIT_CONFIG = WanModelConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=64)
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
             "image_size": 56, "patch_size": 14}  # fmt: skip
TINY_CLIP_TOKENS = 1 + (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"]) ** 2  # class token + 4 x 4 patches
TINY_DIT_VARIANTS: dict[str, WanModelConfig] = {
    "i2v": TINY_DIT_CONFIG.with_(in_dim=36, image_dim=TINY_CLIP["hidden_size"]),
    "flf2v": TINY_DIT_CONFIG.with_(in_dim=36, image_dim=TINY_CLIP["hidden_size"], image_pos_len=2 * TINY_CLIP_TOKENS),
    "i2v_a14b": TINY_DIT_CONFIG.with_(in_dim=36),
    "ti2v": TINY_DIT_CONFIG.with_(in_dim=48, out_dim=48),
}
"""The tiny image-to-video / TI2V DiTs of the kit, by model type."""
TINY_DINOV2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 56, "patch_size": 14}  # fmt: skip
TINY_VAE_BASE_DIM = 16
TINY_T5 = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32, "num_buckets": 32}
TINY_VOCAB_TARGET = 300
COMFY_PREFIX = "model.diffusion_model."

_COLOURS = ("red", "green", "blue", "yellow", "white", "purple", "orange", "black", "pink", "grey")
_SHAPES = ("circle", "square", "triangle", "star", "ball", "box", "ring")
_MOTIONS = ("moving left", "moving right", "moving up", "moving down", "spinning", "bouncing", "standing still")
_EXTRA = (
    "a cinematic shot of a cat walking across a sunny kitchen floor",
    "the camera slowly pans over a quiet mountain lake at dawn",
    "a person in a yellow raincoat walks through the city at night",
    "close up of waves breaking on a sandy beach, soft light",
    "an old car drives down a dusty road, seen from above",
    "two dogs play with a ball in a green park",
    "slow motion, smoke rises from a cup of hot coffee",
    "a bird flies over the forest, high quality, detailed",
)


@dataclass(frozen=True)
class TinyModelKit:
    """Paths of a written kit."""

    root: Path
    dit_wan21: Path
    dit_wan22_high: Path
    dit_wan22_low: Path
    dit_wan21_i2v: Path
    dit_wan21_flf2v: Path
    dit_wan22_i2v_high: Path
    dit_wan22_i2v_low: Path
    dit_wan22_ti2v: Path
    clip: Path
    vae22: Path
    vae: Path
    t5: Path
    tokenizer_dir: Path
    dinov2: Path
    """A local transformers folder of a tiny random ``Dinov2Model`` (REPA's frozen image encoder)."""


def caption_corpus() -> list[str]:
    """The built-in sentences the kit tokenizer is trained on (synthetic-data captions plus general prose)."""
    lines = [
        f"a {colour} {shape} {motion} on a {background} background"
        for colour, shape, motion, background in itertools.product(_COLOURS[:6], _SHAPES, _MOTIONS, _COLOURS[6:])
    ]
    lines += [f"a {colour} {shape} on a {background} background"
              for colour, shape, background in itertools.product(_COLOURS, _SHAPES, _COLOURS)]
    return lines + list(_EXTRA) * 4


# ----------------------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> Path:
    """Train a sentencepiece unigram model (T5 ids: pad 0, eos 1, unk 2) and write ``folder/spiece.model``."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()), model_writer=buffer, vocab_size=TINY_VOCAB_TARGET,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path


def _perturb_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give norm scales and biases seeded non-trivial values, so a swapped key would change the outputs."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("gamma", "layer_norm.weight", "final_layer_norm.weight")):
                param.copy_(1.0 + 0.1 * noise.view_as(param))
            elif name.endswith("bias") and param.ndim == 1:
                param.copy_(0.02 * noise)


def tiny_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A base-width-16 Wan 2.1 VAE in the original key layout (float32)."""
    from diffusers import AutoencoderKLWan

    from ..models.wan.vae import diffusers_to_original

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(base_dim=TINY_VAE_BASE_DIM, z_dim=16)
    _perturb_(model, generator)
    return diffusers_to_original({k: v.clone() for k, v in model.state_dict().items()})


def tiny_umt5_state_dict(seed: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """A 2-layer UMT5 encoder in the official Wan ``.pth`` layout (float32)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from ..models.wan.text_encoder import hf_to_wan

    config = UMT5Config(
        vocab_size=vocab_size, d_model=TINY_T5["d_model"], d_kv=TINY_T5["d_kv"], d_ff=TINY_T5["d_ff"],
        num_layers=TINY_T5["num_layers"], num_heads=TINY_T5["num_heads"],
        relative_attention_num_buckets=TINY_T5["num_buckets"], feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    _perturb_(model, generator)
    return hf_to_wan({k: v.clone() for k, v in model.state_dict().items()})


def tiny_vae22_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A Wan 2.2 VAE of base width 16 (decoder 24) in the original key layout (float32)."""
    from diffusers import AutoencoderKLWan

    from ..models.wan import vae22

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = vae22.diffusers_config({"encoder.conv_in.weight": torch.empty(16, 12, 1, 1, 1),
                                         "decoder.conv_out.weight": torch.empty(12, 24, 1, 1, 1),
                                         "post_quant_conv.weight": torch.empty(48, 48, 1, 1, 1)})  # fmt: skip
        model = AutoencoderKLWan(**config)
    _perturb_(model, generator)
    return vae22.diffusers_to_original({k: v.clone() for k, v in model.state_dict().items()})


def tiny_clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A CLIP vision tower of ``TINY_CLIP`` size in the official Wan ``.pth`` layout (float32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..models.wan.clip_vision import hf_to_wan

    config = CLIPVisionConfig(**TINY_CLIP, hidden_act="gelu", layer_norm_eps=1e-5)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                param.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.05 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif "embedding" in name:
                param.copy_(0.5 * noise)
    hf_state = {("" if k.startswith("vision_model.") else "vision_model.") + k: v.clone()
                for k, v in model.state_dict().items()}  # fmt: skip
    state = hf_to_wan(hf_state)
    width = TINY_CLIP["hidden_size"]
    state["visual.head"] = torch.randn(width, 32, generator=generator) * 0.05  # projection (unused by Wan)
    state["textual.token_embedding.weight"] = torch.randn(8, 32, generator=generator)  # text tower stand-in
    state["log_scale"] = torch.tensor(4.6052)
    return state


def write_tiny_dinov2(folder: Path, seed: int) -> Path:
    """A seeded random ``Dinov2Model`` of ``TINY_DINOV2`` size saved with ``save_pretrained`` (float16, as the
    released DINOv2 weights are often shipped)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    model.half().save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_dit_state_dict(seed: int, config: WanModelConfig = TINY_DIT_CONFIG) -> dict[str, torch.Tensor]:
    """A seeded Wan DiT in the original key layout (float32); the head is non-zero so gradients reach the blocks."""
    from ..models.wan.transformer import WanModel

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanModel(config)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02, generator=generator)
        if model.img_emb is not None and model.img_emb.emb_pos is not None:  # FLF2V: a non-zero position embedding
            model.img_emb.emb_pos.normal_(std=0.5, generator=generator)
    _perturb_(model, generator)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# the kit
# ----------------------------------------------------------------------------------------------------------------


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def make_tiny_model_kit(out_dir: str | Path, seed: int = 0) -> TinyModelKit:
    """Write the kit into ``out_dir`` (created if needed) and return its paths."""
    from transformers import T5Tokenizer

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    kit = TinyModelKit(
        root=root,
        dit_wan21=root / "dit_wan21.safetensors",
        dit_wan22_high=root / "dit_wan22_high_noise.safetensors",
        dit_wan22_low=root / "dit_wan22_low_noise.safetensors",
        dit_wan21_i2v=root / "dit_wan21_i2v.safetensors",
        dit_wan21_flf2v=root / "dit_wan21_flf2v.safetensors",
        dit_wan22_i2v_high=root / "dit_wan22_i2v_high_noise.safetensors",
        dit_wan22_i2v_low=root / "dit_wan22_i2v_low_noise.safetensors",
        dit_wan22_ti2v=root / "dit_wan22_ti2v.safetensors",
        clip=root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        vae22=root / "wan2.2_vae.safetensors",
        vae=root / "wan_2.1_vae.safetensors",
        t5=root / "models_t5_umt5-xxl-enc-bf16.pth",
        tokenizer_dir=root / "tokenizer",
        dinov2=root / "dinov2_tiny",
    )
    write_tokenizer(kit.tokenizer_dir)
    vocab = len(T5Tokenizer.from_pretrained(str(kit.tokenizer_dir), extra_ids=0))
    vocab = -(-vocab // 64) * 64  # embedding rows rounded up, like the released model's 256384

    dits = [(kit.dit_wan21, seed, TINY_DIT_CONFIG), (kit.dit_wan22_high, seed + 100, TINY_DIT_CONFIG),
            (kit.dit_wan22_low, seed + 200, TINY_DIT_CONFIG), (kit.dit_wan21_i2v, seed + 500, TINY_DIT_VARIANTS["i2v"]),
            (kit.dit_wan21_flf2v, seed + 600, TINY_DIT_VARIANTS["flf2v"]),
            (kit.dit_wan22_i2v_high, seed + 700, TINY_DIT_VARIANTS["i2v_a14b"]),
            (kit.dit_wan22_i2v_low, seed + 800, TINY_DIT_VARIANTS["i2v_a14b"]),
            (kit.dit_wan22_ti2v, seed + 900, TINY_DIT_VARIANTS["ti2v"])]  # fmt: skip
    for path, dit_seed, config in dits:
        state = _bf16(tiny_dit_state_dict(dit_seed, config))
        save_file({COMFY_PREFIX + k: v for k, v in state.items()}, str(path), metadata={"format": "pt"})
    save_file(_bf16(tiny_vae_state_dict(seed + 300)), str(kit.vae))
    torch.save(_bf16(tiny_clip_state_dict(seed + 1000)), str(kit.clip))
    save_file(_bf16(tiny_vae22_state_dict(seed + 1100)), str(kit.vae22))
    torch.save(_bf16(tiny_umt5_state_dict(seed + 400, vocab)), str(kit.t5))
    write_tiny_dinov2(kit.dinov2, seed + 1200)
    return kit
