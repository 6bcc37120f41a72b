"""UMT5 wrapper: parity with the Wan reference math and with transformers, tokenizer, fp8, file layouts, errors."""

from __future__ import annotations

import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from wantrainer.errors import UserError
from wantrainer.models.wan.text_encoder import (
    WanTextEncoder,
    build_umt5,
    clean_prompt,
    load_tokenizer,
    to_hf_layout,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["a red circle moving left on a blue background", "two dogs play", ""]

# Wan .pth key (inside blocks.N) -> transformers UMT5 key (inside encoder.block.N), written out independently
HF_NAMES = {
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


def _hf_state(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"shared.weight": wan["token_embedding.weight"], "encoder.final_layer_norm.weight": wan["norm.weight"]}
    for key, value in wan.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            out[f"encoder.block.{index}.{HF_NAMES[rest]}"] = value
    return out


# ---- the Wan reference encoder (wan/modules/t5.py: T5Encoder with shared_pos=False), as plain functions ----


def _rms(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _buckets(rel_pos, num_buckets, max_dist=128):
    num_buckets //= 2  # bidirectional
    buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = rel_pos.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def wan_reference_encode(wan, ids, mask):
    sd = {k: v.float() for k, v in wan.items()}
    x = sd["token_embedding.weight"][ids]
    b, length = ids.shape
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
        table = p("pos_embedding.embedding.weight")
        n = table.shape[1]
        rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        bias = table[_buckets(rel, table.shape[0])].permute(2, 0, 1)[None]  # [1, N, Lq, Lk]
        bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        h = _rms(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{t}.weight")).view(b, length, n, -1) for t in "qkv")
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1), p("attn.o.weight"))
        h = _rms(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return _rms(x, sd["norm.weight"])


@pytest.fixture(scope="module")
def wan_state(tiny_kit):
    return torch.load(str(tiny_kit.t5), weights_only=True)


@pytest.fixture(scope="module")
def encoder(tiny_kit):
    return WanTextEncoder.load(tiny_kit.t5, tiny_kit.tokenizer_dir)


def test_matches_the_wan_reference_math(encoder, wan_state):
    ids, mask = encoder.tokenize(PROMPTS)
    expected = wan_reference_encode(wan_state, ids, mask)
    out = encoder.encode(PROMPTS)
    for i, emb in enumerate(out):
        n = int(mask[i].sum())
        assert emb.shape == (n, 64) and emb.dtype == torch.float32
        torch.testing.assert_close(emb, expected[i, :n], rtol=0, atol=1e-5)
    assert out[2].shape == (1, 64)  # the empty prompt is just </s>


def test_matches_transformers_built_from_hf_keys(encoder, wan_state, tiny_kit, tmp_path):
    hf = {k: v.float() for k, v in _hf_state(wan_state).items()}
    vocab, d_model = hf["shared.weight"].shape
    config = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)
    model = UMT5EncoderModel(config).eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = encoder.encode(PROMPTS)
    for i, emb in enumerate(ours):
        torch.testing.assert_close(emb, expected[i, : emb.shape[0]], rtol=0, atol=1e-5)

    # the same weights as an HF / ComfyUI-layout safetensors load to the same encoder
    save_file({**_hf_state(wan_state), "encoder.embed_tokens.weight": wan_state["token_embedding.weight"].clone()},
              str(tmp_path / "umt5_xxl_hf.safetensors"))
    again = WanTextEncoder.load(tmp_path / "umt5_xxl_hf.safetensors", tiny_kit.tokenizer_dir).encode(PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(again, ours))


def test_tokenizer_round_trip(tiny_kit, encoder):
    processor = spm.SentencePieceProcessor(model_file=str(tiny_kit.tokenizer_dir / "spiece.model"))
    tokenizer = encoder.tokenizer
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.unk_token_id == 2
    for text in ("a red circle moving left on a blue background", "the camera slowly pans over a quiet lake"):
        ids = tokenizer(text)["input_ids"]
        assert ids == processor.encode(text) + [1]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    ids, mask = encoder.tokenize(PROMPTS)
    assert ids.shape[0] == 3 and mask[2].sum() == 1 and ids[2, 0] == 1


def test_padding_does_not_change_outputs_and_length_is_capped(encoder):
    alone = encoder.encode(["two dogs play"])[0]
    batched = encoder.encode(["two dogs play", "a " * 100 + "long prompt"])[0]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)
    assert encoder.encode(["red " * 700])[0].shape[0] == 512


def test_clean_prompt():
    assert clean_prompt("  a   red\n&amp;amp; blue\t") == "a red & blue"
    # Wan's basic_clean runs ftfy.fix_text first (the UMT5 tokenizer alone keeps curly quotes as other tokens)
    assert clean_prompt("It\u2019s a \u201ccat\u201d, caf\u00c3\u00a9 \uff21\uff22") == 'It\'s a "cat", caf\u00e9 AB'


def test_fp8_weights(tiny_kit, encoder):
    fp8 = WanTextEncoder.load(tiny_kit.t5, tiny_kit.tokenizer_dir, fp8=True)
    q = fp8.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.parametrizations.weight.original0.dtype == torch.float8_e4m3fn
    assert q.weight.dtype == torch.float32  # read back in the compute dtype
    for a, b in zip(fp8.encode(PROMPTS), encoder.encode(PROMPTS)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
        assert not torch.equal(a, b)


@pytest.mark.parametrize("new_format", [False, True], ids=["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_file(wan_state, tiny_kit, encoder, tmp_path, new_format):
    """ComfyUI's umt5_xxl_fp8_e4m3fn_scaled layout: HF keys, fp8 Linear weights with per-tensor scales (the
    ``scaled_fp8`` marker + ``scale_weight`` / ``scale_input``, or ``weight_scale`` / ``input_scale`` /
    ``comfy_quant``), and the tokenizer model embedded as a ``spiece_model`` uint8 tensor."""
    hf = _hf_state(wan_state)
    state = {"spiece_model": torch.tensor(list(b"sentencepiece model bytes"), dtype=torch.uint8)}
    if not new_format:
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    for key, value in hf.items():
        if key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            layer = key.removesuffix(".weight")
            scale = value.float().abs().max() / 448
            state[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            if new_format:
                state[layer + ".weight_scale"] = scale.reshape(())
                state[layer + ".input_scale"] = torch.tensor(0.5)
                state[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            else:
                state[layer + ".scale_weight"] = scale.reshape(())
                state[layer + ".scale_input"] = torch.tensor(1.0)
        else:
            state[key] = value
    save_file(state, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    loaded = WanTextEncoder.load(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", tiny_kit.tokenizer_dir)
    for a, b in zip(loaded.encode(PROMPTS), encoder.encode(PROMPTS)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="`t5_tokenizer` is not set.*google/umt5-xxl"):
        load_tokenizer(None)
    with pytest.raises(UserError, match="not found.*spiece.model"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no spiece.model or tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="'google/umt5-xxl': no such folder, and it cannot be loaded as a hub id"):
        load_tokenizer("google/umt5-xxl")  # the tests run offline


def test_checkpoint_errors(tiny_kit, tmp_path):
    with pytest.raises(UserError, match="not found"):
        WanTextEncoder.load(tmp_path / "missing.pth", tiny_kit.tokenizer_dir)
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a UMT5 encoder checkpoint"):
        WanTextEncoder.load(tmp_path / "other.safetensors", tiny_kit.tokenizer_dir)


def _umt5_xxl_shapes() -> dict[str, tuple[int, ...]]:
    """models_t5_umt5-xxl-enc-bf16.pth as Wan's t5.py builds it: umt5_xxl (vocab 256384, dim 4096, dim_attn 4096,
    dim_ffn 10240, 64 heads, 24 encoder layers, 32 buckets, shared_pos=False: one relative embedding per block)."""
    shapes = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for n in range(24):
        shapes |= {f"blocks.{n}.norm1.weight": (4096,), f"blocks.{n}.norm2.weight": (4096,),
                   f"blocks.{n}.pos_embedding.embedding.weight": (32, 64),
                   f"blocks.{n}.ffn.gate.0.weight": (10240, 4096), f"blocks.{n}.ffn.fc1.weight": (10240, 4096),
                   f"blocks.{n}.ffn.fc2.weight": (4096, 10240)}  # fmt: skip
        shapes |= {f"blocks.{n}.attn.{p}.weight": (4096, 4096) for p in "qkvo"}
    return shapes


def test_the_released_umt5_xxl_layout_gives_its_sizes():
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in _umt5_xxl_shapes().items()}
        model = build_umt5(to_hf_layout(state, "models_t5_umt5-xxl-enc-bf16.pth"))  # strict: keys and shapes
    c = model.config
    assert (c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.d_kv, c.d_ff) == (256384, 4096, 24, 64, 64, 10240)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.feed_forward_proj == "gated-gelu" and c.layer_norm_epsilon == 1e-6
    assert all(block.layer[0].SelfAttention.has_relative_attention_bias for block in model.encoder.block)
