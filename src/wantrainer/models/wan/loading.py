"""Loading Wan DiT checkpoints: file discovery, layout checks, architecture inference, dtype / fp8 rules.

The model is built on the meta device and filled with ``load_state_dict(assign=True)`` from memory-mapped
safetensors, one tensor at a time, so loading never holds two full copies of the weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from wantrainer.common.logger import get_logger
from wantrainer.errors import UserError

from .configs import HEAD_DIM, WanModelConfig, known_config_name
from .fp8 import FP8_DTYPE, FP8_DTYPES, is_fp8_block_linear, quantize_weight, store_block_linears
from .stored_linear import StoredLinear
from .transformer import WanModel

logger = get_logger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")
_IGNORED_KEYS = ("scaled_fp8",)  # marker tensor of ComfyUI's scaled-fp8 files
# ComfyUI scaled fp8: the weight scale is ``<layer>.scale_weight`` (files with the ``scaled_fp8`` marker) or
# ``<layer>.weight_scale`` (current format, with ``<layer>.comfy_quant`` markers); the activation scales
# (``scale_input`` / ``input_scale``) only serve fp8 matmuls and are not needed to dequantise the weight.
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_UNUSED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": FP8_DTYPE,
                 "fp8_scaled": FP8_DTYPE}  # fmt: skip
"""``dit_weight_dtype`` values (besides "auto") -> the storage dtype of the block Linear weights."""


class CheckpointMismatchError(UserError):
    """The file is not a Wan DiT in the original layout (or is incomplete, or of an unsupported variant)."""


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str  # key inside the file (with its prefix)
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"


# ----- files ------------------------------------------------------------------------------------------------
def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint given as a file, the first shard, an index json or a folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"DiT checkpoint not found: {path} (check the `dit` / `dit_high_noise` path)")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            return _files_from_index(indexes[0])
        if len(singles) == 1:
            return singles
        raise UserError(
            f"{path} is a folder without an index json and with {len(singles)} .safetensors files"
        )
    if path.name.endswith(".index.json"):
        return _files_from_index(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise UserError(f"{path}: only .safetensors DiT checkpoints are supported; convert this file first")
    match = _SHARD.match(path.name)
    if match:
        index = path.with_name(f"{match['stem']}.safetensors.index.json")
        if index.exists():
            return _files_from_index(index)
        return sorted(path.parent.glob(f"{match['stem']}-*-of-*.safetensors"))
    return [path]


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{index}: not a safetensors index json ({exc})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise UserError(f"{index} names shards that do not exist: {', '.join(missing[:3])}")
    return files


def read_tensor_index(files: list[Path]) -> dict[str, TensorEntry]:
    """Map each (prefix-stripped) key to its file, shape and stored dtype, reading headers only."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    name = strip_prefix(key)
                    entries[name] = TensorEntry(
                        file, key, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    )
        except (OSError, RuntimeError, ValueError) as exc:
            raise UserError(f"{file}: cannot read as safetensors ({exc})") from None
    return entries


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# ----- layout ---------------------------------------------------------------------------------------------
def guess_layout(keys) -> str:
    """A short description of what a state dict with these keys looks like."""
    keys = list(keys)
    joined = "\n".join(keys[:20000])
    if re.search(r"lora_(down|up|A|B)\b|\.alpha$|lora_unet_", joined, re.M):
        return "this looks like a LoRA, not a base model (put it in the network / sampling LoRA options)"
    if "condition_embedder." in joined or ".attn1.to_q." in joined or "scale_shift_table" in joined:
        return (
            "this looks like a diffusers-layout file (WanTransformer3DModel); use the original / ComfyUI file"
        )
    if re.search(
        r"^(encoder|decoder)\.(conv1|conv_in|downsamples|down_blocks|upsamples|up_blocks)", joined, re.M
    ):
        return "this looks like a VAE"
    if "shared.weight" in joined or "encoder.block." in joined or "token_embedding." in joined:
        return "this looks like a text encoder (T5 / UMT5)"
    if "vace_blocks." in joined:
        return "this looks like a Wan VACE model, which is not supported (T2V, I2V, FLF2V and TI2V-5B are)"
    if "img_emb." in joined or ".k_img." in joined:
        return "this looks like a Wan 2.1 I2V / FLF2V DiT, but incomplete (img_emb and k_img / v_img go together)"
    if "patch_embedding.weight" in joined and "blocks.0.self_attn.q.weight" in joined:
        return "this looks like a Wan DiT in the original layout, but incomplete or of another variant"
    return "this does not look like a Wan DiT"


def is_weight_key(key: str) -> bool:
    """False for the scale / marker tensors of quantised files, which are read alongside their weights."""
    return key not in _IGNORED_KEYS and not key.endswith(_SCALE_SUFFIXES + _UNUSED_SUFFIXES)


def scale_entry(entries: dict[str, TensorEntry], key: str) -> TensorEntry | None:
    """The stored fp8 scale of the weight ``key`` (either ComfyUI naming), or None."""
    if not key.endswith(".weight"):
        return None
    layer = key.removesuffix(".weight")
    return entries.get(layer + ".scale_weight") or entries.get(layer + ".weight_scale")


def check_variant(config: WanModelConfig, source: str) -> None:
    """Refuse channel layouts that are none of the released variants (``configs.MODEL_TYPES``)."""
    known = (config.in_dim, config.out_dim) in ((16, 16), (36, 16), (48, 48))
    if known and not (config.image_pos_len is not None and config.image_dim is None):
        return
    raise CheckpointMismatchError(
        f"{source} is a Wan DiT with {config.in_dim} input / {config.out_dim} output channels, which is none of the "
        "supported variants: T2V (16 / 16), I2V and FLF2V (36 / 16), TI2V-5B (48 / 48)"
    )


def check_stored_tensors(
    entries: dict[str, TensorEntry], expected: dict[str, torch.Tensor], source: str
) -> None:
    """Every weight a float of the model's shape, every fp8 scale per tensor or per output row."""
    for key, tensor in expected.items():
        entry = entries.get(key) if is_weight_key(key) else None
        if entry is None:
            continue
        if entry.dtype not in _FLOAT_DTYPES or entry.shape != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source}: {key} is stored as {entry.dtype} {list(entry.shape)}, the model needs a float "
                f"{list(tensor.shape)}; quantised formats other than fp8 (nvfp4, int8, GGUF, ...) are not "
                "supported: use the bf16 / fp16 / fp8 file"
            )
        scale = scale_entry(entries, key)
        if scale is not None and math.prod(scale.shape) not in (1, tensor.shape[0]):
            raise CheckpointMismatchError(
                f"{source}: the fp8 scale of {key} has shape {list(scale.shape)}; only per-tensor or "
                "per-output-row scales are supported"
            )


def _mismatch(what: str, missing: list[str], unexpected: list[str], keys) -> CheckpointMismatchError:
    lines = [f"{what} does not match the Wan DiT layout: {guess_layout(keys)}."]
    if missing:
        lines.append(
            f"  missing ({len(missing)}): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        more = " ..." if len(unexpected) > 5 else ""
        lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}{more}")
    return CheckpointMismatchError("\n".join(lines))


def infer_wan_config(shapes: dict[str, tuple[int, ...]], source: str = "the checkpoint") -> WanModelConfig:
    """The architecture from the tensor shapes of an original-layout state dict (prefix already stripped)."""
    required = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                "blocks.0.ffn.0.weight", "head.head.weight")  # fmt: skip
    missing = [k for k in required if k not in shapes]
    if missing:
        raise _mismatch(source, missing, [], shapes)
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    if len(patch) != 3:
        raise _mismatch(source, ["patch_embedding.weight (5-D)"], [], shapes)
    layers = 1 + max(
        int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()
    )
    if dim % HEAD_DIM and dim > HEAD_DIM:
        raise CheckpointMismatchError(f"{source}: dim {dim} is not a multiple of the head width {HEAD_DIM}")
    image_dim = shapes.get("img_emb.proj.1.weight", (None, None))[1]  # Wan 2.1 I2V / FLF2V CLIP branch
    pos = shapes.get("img_emb.emb_pos")  # FLF2V: [1, 2 x 257, 1280]
    return WanModelConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=max(1, dim // HEAD_DIM),
        num_layers=layers,
        in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        patch_size=tuple(patch),
        image_dim=image_dim,
        image_pos_len=pos[1] if pos is not None and len(pos) == 3 else None,
    )


# ----- dtype rules ----------------------------------------------------------------------------------------
def _target_dtype(key: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a non-fp8 parameter gets: precision-sensitive ones float32 when a dtype is chosen."""
    if dtype is None:
        return torch.bfloat16 if stored in FP8_DTYPES else stored
    keep = set(WanModel._keep_in_fp32_modules)
    return torch.float32 if keep & set(key.split(".")) else dtype


def _convert(key: str, tensor: torch.Tensor, scale: torch.Tensor | None, expected: torch.Tensor,
             dtype: torch.dtype | None, scaled: bool, stored_linear: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors the model receives for one file tensor (a quantised weight brings its scale);
    ``stored_linear``: the weight of a ``StoredLinear``, which keeps the expected (storage) dtype."""
    stored = tensor.dtype
    if expected.dtype in FP8_DTYPES and scaled and scale is not None and stored == expected.dtype:
        # a pre-scaled fp8 file kept as stored: the same fp8 values, the scale ([] or [out]) per output row
        rows = scale.float().reshape(-1).expand(tensor.shape[0]).contiguous()
        return {key: tensor, key.removesuffix("weight") + "scale_weight": rows}
    if scale is not None:  # a pre-scaled fp8 file: scale [] or [out]
        tensor = tensor.float() * scale.float().reshape(-1, *([1] * (tensor.ndim - 1)))
    if expected.dtype in FP8_DTYPES:
        if tensor.dtype in FP8_DTYPES and not scaled:
            return {key: tensor.to(expected.dtype)}
        weight, new_scale = quantize_weight(tensor, scaled)
        out = {key: weight}
        if new_scale is not None:
            out[key.removesuffix("weight") + "scale_weight"] = new_scale
        return out
    if stored_linear:
        return {key: tensor.to(expected.dtype)}
    return {key: tensor.to(_target_dtype(key, stored, dtype))}


def resolve_weight_storage(weight_dtype: str, fp8_base: bool, fp8_scaled: bool, dtype: torch.dtype | None,
                           entries: dict[str, TensorEntry]) -> tuple[torch.dtype | None, bool, torch.dtype]:  # fmt: skip
    """(storage dtype of the block Linear weights or None for "as the other weights", fp8 scaled?, compute dtype).

    ``fp8_base`` / ``fp8_scaled`` are the older spelling of ``weight_dtype = "fp8"`` / ``"fp8_scaled"``.
    ``"auto"``: the compute dtype, except that with ``dtype`` None the file's dtypes are kept (an fp8 file stays
    fp8, with its scales when it has them).
    """
    if weight_dtype not in ("auto", *WEIGHT_DTYPES):
        raise UserError(f"`dit_weight_dtype` = {weight_dtype!r}: use one of auto, {', '.join(WEIGHT_DTYPES)}")
    legacy = "fp8_scaled" if fp8_scaled else "fp8" if fp8_base else None
    if legacy is not None and weight_dtype not in ("auto", legacy):
        raise UserError(f"`dit_weight_dtype` = \"{weight_dtype}\" and `{'fp8_scaled' if fp8_scaled else 'fp8_base'}` "
                        f"= true disagree; keep only `dit_weight_dtype` (\"{legacy}\" is what the old key means)")
    mode = legacy or weight_dtype
    patch = entries.get("patch_embedding.weight")
    stored_patch = _STORED_DTYPES.get(patch.dtype, torch.float32) if patch is not None else torch.float32
    compute = dtype if dtype is not None else _target_dtype("patch_embedding.weight", stored_patch, None)
    if mode == "auto":
        stored_fp8 = any(is_fp8_block_linear(k) and e.dtype.startswith("F8") for k, e in entries.items())
        if dtype is None and stored_fp8:
            return FP8_DTYPE, any(k.endswith(_SCALE_SUFFIXES) for k in entries), compute
        return None, False, compute
    return WEIGHT_DTYPES[mode], mode == "fp8_scaled", compute


# ----- the loader -----------------------------------------------------------------------------------------
def load_wan_dit(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weight_dtype: str = "auto",
    fp8_base: bool = False,
    fp8_scaled: bool = False,
    attn_mode: str = "sdpa",
) -> WanModel:
    """Load a Wan DiT checkpoint (architecture inferred from its shapes) onto ``device``.

    ``dtype``: the compute dtype (precision-sensitive parameters stay float32); None keeps the stored dtypes.
    ``weight_dtype``: the storage of the block Linear weights (``dit_weight_dtype``: "auto", "bf16", "fp16",
    "fp32", "fp8", "fp8_scaled"; see ``resolve_weight_storage`` and ``fp8.py``); when it differs from the
    compute dtype those layers are ``StoredLinear`` and upcast per call. ``fp8_base`` / ``fp8_scaled``: the
    older spelling of "fp8" / "fp8_scaled".

    Each tensor is read, converted and placed on its own (the file is opened per tensor, so its pages leave the
    process once the tensor is converted): loading holds one copy of the weights in their final dtype.
    """
    files = checkpoint_files(path)
    entries = read_tensor_index(files)
    source = str(path)
    config = infer_wan_config({k: v.shape for k, v in entries.items()}, source)
    check_variant(config, source)
    storage, scaled, compute = resolve_weight_storage(weight_dtype, fp8_base, fp8_scaled, dtype, entries)
    with torch.device("meta"):
        model = WanModel(config, attn_mode=attn_mode)
    if storage is not None and (storage != compute or scaled):
        store_block_linears(model, storage, scaled)
    expected = model.state_dict()
    stored_keys = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, StoredLinear)}
    file_keys = {k for k in entries if is_weight_key(k)}
    model_keys = {k for k in expected if not k.endswith(".scale_weight")}
    if file_keys != model_keys:
        raise _mismatch(source, sorted(model_keys - file_keys), sorted(file_keys - model_keys), entries)
    check_stored_tensors(entries, expected, source)

    state: dict[str, torch.Tensor] = {}
    device = torch.device(device)
    for key in sorted(file_keys, key=lambda k: (str(entries[k].file), k)):
        stored_scale = scale_entry(entries, key)
        scale = _read(stored_scale, device) if stored_scale is not None else None
        tensor = _read(entries[key], device)
        converted = _convert(key, tensor, scale, expected[key], dtype, scaled, key in stored_keys)
        # a tensor the conversion left as a view of the memory-mapped file is copied into the process's own
        # memory: the file's pages then leave the process, and the model does not depend on the file
        mapped = tensor.data_ptr() if tensor.device.type == "cpu" else None
        state.update({k: v.clone() if v.data_ptr() == mapped else v for k, v in converted.items()})
        del tensor, scale, converted
    model.load_state_dict(state, strict=True, assign=True)
    del state
    name = known_config_name(config) or "custom size"
    fp8 = ", fp8 scaled" if storage in FP8_DTYPES and scaled else ", fp8" if storage in FP8_DTYPES else ""
    kept = f", block Linear weights stored in {str(storage).removeprefix('torch.')}" if (
        storage is not None and storage not in FP8_DTYPES and storage != compute) else ""  # fmt: skip
    logger.info("loaded Wan DiT %s (%s, %s): %s, compute dtype %s%s%s", source, name, config.model_type,
                _describe(config), model.dtype, fp8, kept)  # fmt: skip
    return model


def _read(entry: TensorEntry, device: torch.device) -> torch.Tensor:
    with safe_open(entry.file, framework="pt", device=str(device)) as handle:
        return handle.get_tensor(entry.key)


def _describe(config: WanModelConfig) -> str:
    return (f"dim {config.dim}, ffn {config.ffn_dim}, {config.num_layers} layers, {config.num_heads} heads, "
            f"in/out {config.in_dim}/{config.out_dim}, text_dim {config.text_dim}")  # fmt: skip
