"""The UMT5 text encoder: official Wan ``.pth`` layout or HF / ComfyUI safetensors -> transformers ``UMT5EncoderModel``.

Wan layout (``models_t5_umt5-xxl-enc-bf16.pth``): ``token_embedding.weight``, ``blocks.N.norm1.weight``,
``blocks.N.attn.{q,k,v,o}.weight``, ``blocks.N.pos_embedding.embedding.weight`` (one relative position bias per
layer), ``blocks.N.norm2.weight``, ``blocks.N.ffn.gate.0.weight`` (the GELU branch), ``blocks.N.ffn.fc1.weight``,
``blocks.N.ffn.fc2.weight``, ``norm.weight``. HF layout: ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.*``,
``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}``, ``encoder.final_layer_norm.weight``. ComfyUI's
``*_fp8_e4m3fn_scaled`` files (per-tensor ``scale_weight`` or ``weight_scale``) are dequantised on load. Sizes come from the weights.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ...common.logger import get_logger
from ...errors import UserError
from .vae import read_weights

logger = get_logger(__name__)

MAX_TOKENS = 512
TOKENIZER_HELP = (
    "download the tokenizer files of google/umt5-xxl (spiece.model, or tokenizer.json with tokenizer_config.json "
    "and special_tokens_map.json) from https://huggingface.co/google/umt5-xxl into a folder and set "
    "`t5_tokenizer` to that folder"
)

# Wan key suffix inside blocks.N -> HF key suffix inside encoder.block.N
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}


# ----------------------------------------------------------------------------------------------------------------
# 1. Key layouts
# ----------------------------------------------------------------------------------------------------------------


def _rename_keys(state: dict[str, torch.Tensor], block_pattern: str, block_prefix: str, block_keys: dict[str, str],
                 top_keys: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename top-level keys by ``top_keys`` and ``{block}.N.<suffix>`` keys by ``block_keys``; also the keys
    neither map knows, in order."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        match = re.fullmatch(block_pattern, key)
        if key in top_keys:
            out[top_keys[key]] = value
        elif match and match.group(2) in block_keys:
            out[f"{block_prefix}.{match.group(1)}.{block_keys[match.group(2)]}"] = value
        else:
            unknown.append(key)
    return out, unknown


def wan_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan ``.pth`` keys -> HF ``UMT5EncoderModel`` keys."""
    out, unknown = _rename_keys(state, r"blocks\.(\d+)\.(.+)", "encoder.block", _BLOCK_KEYS, _TOP_KEYS)
    if unknown:
        raise UserError(f"unexpected key in a Wan T5 checkpoint: {unknown[0]}")
    return out


def hf_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``UMT5EncoderModel`` keys -> Wan ``.pth`` keys (the inverse of ``wan_to_hf``)."""
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    out, unknown = _rename_keys(state, r"encoder\.block\.(\d+)\.(.+)", "blocks", block, top)
    unknown = [key for key in unknown if key != "encoder.embed_tokens.weight"]
    if unknown:
        raise ValueError(f"unexpected UMT5 key: {unknown[0]}")
    return out


_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_UNUSED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


def _dequantise_scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI ``*_fp8_scaled`` files: weight (fp8) * its scale -> bfloat16; marker / activation-scale keys dropped.

    Both ComfyUI formats: ``scaled_fp8`` marker with ``<layer>.scale_weight`` / ``scale_input``, and the current
    ``<layer>.weight_scale`` / ``input_scale`` / ``comfy_quant``. Scales are per tensor or per output row.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith(_SCALE_SUFFIXES + _UNUSED_SUFFIXES):
            continue
        layer = key.removesuffix(".weight")
        scale = next((state[layer + s] for s in _SCALE_SUFFIXES if layer + s in state), None)
        if key.endswith(".weight") and scale is not None:
            value = (value.float() * scale.float().reshape(-1, 1)).to(torch.bfloat16)
        out[key] = value
    return out


def to_hf_layout(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Any supported layout -> HF keys, with ``shared.weight`` present and the tied copy dropped."""
    state = _dequantise_scaled_fp8(state)
    if "token_embedding.weight" in state:
        return wan_to_hf(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" not in state:
        raise UserError(
            f"{path} is not a UMT5 encoder checkpoint: expected `token_embedding.weight` (Wan .pth) or "
            "`shared.weight` (HF / ComfyUI safetensors)"
        )
    state = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
    state.pop("encoder.embed_tokens.weight", None)
    return state


def umt5_config_from_state_dict(state: dict[str, torch.Tensor]) -> UMT5Config:
    """An encoder-only ``UMT5Config`` whose sizes are read from HF-layout weights."""
    vocab, d_model = state["shared.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    num_buckets, num_heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    d_ff = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff, num_layers=len(layers),
        num_heads=num_heads, relative_attention_num_buckets=num_buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
        use_cache=False,
    )


def build_umt5(state: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> UMT5EncoderModel:
    """HF-layout weights -> ``UMT5EncoderModel`` holding exactly those tensors (built on the meta device)."""
    config = umt5_config_from_state_dict(state)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        model.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]}, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not match a UMT5 encoder: {exc}") from None
    model.encoder.embed_tokens = model.shared
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# 2. fp8 weight storage
# ----------------------------------------------------------------------------------------------------------------


class _Fp8Upcast(nn.Module):
    """Weight parametrization: stored as float8_e4m3fn plus one float32 scale per output row, read in ``dtype``."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (stored.to(torch.float32) * scale).to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = weight.detach().float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        return (weight.float() / scale).to(torch.float8_e4m3fn), scale


def store_linears_in_fp8(model: nn.Module) -> int:
    """Keep every Linear weight of the encoder blocks in fp8; each use upcasts it. Returns the count."""
    count = 0
    for module in model.encoder.block.modules():
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
            parametrize.register_parametrization(module, "weight", _Fp8Upcast(module.weight.dtype), unsafe=True)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# 3. Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def load_tokenizer(spec: str | Path | None) -> PreTrainedTokenizerBase:
    """A local folder (tokenizer_config.json / tokenizer.json / spiece.model) or, when online, a hub id."""
    from transformers import AutoTokenizer, T5Tokenizer

    if spec is None or str(spec) == "":
        raise UserError(f"`t5_tokenizer` is not set: {TOKENIZER_HELP}")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder))
        if (folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file():
            return T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
        raise UserError(f"`t5_tokenizer` folder {folder} has no spiece.model or tokenizer.json: {TOKENIZER_HELP}")
    if folder.exists() or folder.is_absolute() or str(spec).startswith((".", "~")) or str(spec).count("/") != 1:
        raise UserError(f"`t5_tokenizer` folder not found: {folder}; {TOKENIZER_HELP}")
    try:
        return AutoTokenizer.from_pretrained(str(spec))
    except OSError as exc:
        raise UserError(
            f"`t5_tokenizer` = {str(spec)!r}: no such folder, and it cannot be loaded as a hub id ({exc}); offline, "
            f"{TOKENIZER_HELP}"
        ) from None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (``clean="whitespace"``, as musubi-tuner and diffusers do it too): ``ftfy.fix_text``
    (curly quotes straightened, mojibake repaired, full-width letters narrowed), HTML entities decoded, whitespace
    runs collapsed."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------------------------------
# 4. The wrapper
# ----------------------------------------------------------------------------------------------------------------


class WanTextEncoder:
    """UMT5 encoder + tokenizer: ``encode(prompts) -> [Tensor[L_i, D]]`` trimmed to each prompt's real tokens."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, device, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = MAX_TOKENS

    @classmethod
    def load(
        cls,
        t5_path: str | Path,
        tokenizer: str | Path | PreTrainedTokenizerBase | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        fp8: bool = False,
    ) -> WanTextEncoder:
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = load_tokenizer(tokenizer)
        state = to_hf_layout(read_weights(t5_path, "T5 text encoder"), t5_path)
        model = build_umt5(state, t5_path).to(device=device, dtype=dtype)
        if fp8:
            store_linears_in_fp8(model)
        if len(tokenizer) > model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {len(tokenizer)} tokens but {t5_path} embeds only {model.config.vocab_size}: "
                "`t5_tokenizer` does not belong to this text encoder"
            )
        logger.info(
            "loaded UMT5 %s (d_model %d, %d layers, %s%s)", Path(t5_path).name, model.config.d_model,
            model.config.num_layers, dtype, ", fp8 weights" if fp8 else "",
        )
        return cls(model, tokenizer, device, dtype)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def to(self, device: str | torch.device) -> WanTextEncoder:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), padded to the longest prompt, at most 512 tokens (incl. ``</s>``)."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="longest", truncation=True, max_length=self.max_length,
            add_special_tokens=True, return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt before truncation (``</s>`` included): above ``max_length`` the rest is cut."""
        batch = self.tokenizer([clean_prompt(p) for p in prompts], truncation=False, add_special_tokens=True)
        return [len(ids) for ids in batch["input_ids"]]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        if not prompts:
            return []
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, :n].clone() for i, n in enumerate(lengths)]
