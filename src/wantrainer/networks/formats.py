"""LoRA files: save (kohya/musubi layout), load any common layout, convert between layouts, metadata.

Layouts read by ``load_lora`` (all converted to kohya keys):

- kohya / musubi: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
- ComfyUI / diffusion-pipe: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight``
  (``lora_down`` / ``lora_up`` too; no ``.alpha`` means alpha = rank, i.e. scale 1)
- diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (scale 1)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from ..utils.atomic import save_safetensors_atomic
from .adapters import ADAPTER_SUFFIXES, adapter_kind
from .lora_wan import KOHYA_PREFIX, kohya_name

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("kohya", "diffusion_model", "diffusers")

# Original Wan module path <-> diffusers WanTransformer3DModel module path (Linear layers only).
_BLOCK_MAP = [
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
]  # fmt: skip
_TOP_MAP = [
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
]
_ORIG_PATH_RE = re.compile(
    r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))|"
    r"(text_embedding|time_embedding)\.(0|2)|time_projection\.1|head\.head"
)
_KOHYA_RE = re.compile(
    r"blocks_(\d+)_(self_attn_(q|k|v|o)|cross_attn_(q|k|v|o|k_img|v_img)|ffn_(0|2))|"
    r"(text_embedding|time_embedding)_(0|2)|time_projection_1|head_head"
)


def kohya_to_path(name: str) -> str:
    """``"lora_unet_blocks_0_self_attn_q"`` -> ``"blocks.0.self_attn.q"`` (known Wan Linears only)."""
    body = name[len(KOHYA_PREFIX) :] if name.startswith(KOHYA_PREFIX) else name
    m = _KOHYA_RE.fullmatch(body)
    if m is None:
        raise UserError(f"LoRA module {name!r} is not a known Wan Linear")
    if m.group(1) is not None:
        part = m.group(2)
        for group in ("self_attn", "cross_attn", "ffn"):
            if part.startswith(group + "_"):
                return f"blocks.{m.group(1)}.{group}.{part[len(group) + 1 :]}"
    for orig, _ in _TOP_MAP:
        if orig.replace(".", "_") == body:
            return orig
    raise UserError(f"LoRA module {name!r} is not a known Wan Linear")


def _translate(path: str, block_pairs, top_pairs, error: str) -> str:
    """Map a module path through (from, to) pairs: ``blocks.N.<from>`` by ``block_pairs``, others by ``top_pairs``."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", path)
    if m:
        for source, target in block_pairs:
            if m.group(2) == source:
                return f"blocks.{m.group(1)}.{target}"
    for source, target in top_pairs:
        if path == source:
            return target
    raise UserError(error)


def diffusers_to_path(path: str) -> str:
    return _translate(path, [(d, o) for o, d in _BLOCK_MAP], [(d, o) for o, d in _TOP_MAP],
                      f"LoRA module {path!r} (diffusers layout) has no Wan equivalent")


def path_to_diffusers(path: str) -> str:
    return _translate(path, _BLOCK_MAP, _TOP_MAP, f"module {path!r} has no diffusers equivalent")


# -- detection and conversion to kohya --------------------------------------------------------------

_LYCORIS_SUFFIXES = tuple(x for x in ADAPTER_SUFFIXES if x not in ("lora_down.weight", "lora_up.weight", "alpha"))
_SUFFIX_RE = re.compile(
    r"(.+)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha|"
    + "|".join(_LYCORIS_SUFFIXES) + ")"
)
FP32_SUFFIXES = (".alpha", ".dora_scale")
"""Saved in float32 whatever the save precision: ``alpha`` and the DoRA magnitudes (a bf16 magnitude would change
the layer by up to 0.4 %)."""
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")


def detect_layout(keys: list[str]) -> str:
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "diffusion_model"
    bare = [_strip_prefix(k) for k in keys]
    if any(re.match(r"blocks\.\d+\.(attn1|attn2|ffn\.net)\.", k) for k in bare):
        return "diffusers"
    if any(re.match(r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.", k) for k in bare):
        return "diffusion_model"
    raise UserError(f"unrecognised LoRA layout (first keys: {sorted(keys)[:3]})")


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def to_kohya(sd: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a LoRA state dict of any supported layout to kohya keys; adds ``.alpha = rank`` if absent."""
    layout = layout or detect_layout(list(sd))
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _SUFFIX_RE.fullmatch(key if layout == "kohya" else _strip_prefix(key))
        if m is None:
            raise UserError(f"unsupported tensor in LoRA file: {key!r} (only lora_down/up, lora_A/B, alpha, "
                            "LoHa hada_*, LoKr lokr_* and DoRA dora_scale)")
        module, kind = m.group(1), m.group(2)
        if layout == "kohya":
            kohya_to_path(module)  # validates the name
            name = module
        else:
            path = diffusers_to_path(module) if layout == "diffusers" else module
            if not _ORIG_PATH_RE.fullmatch(path):
                raise UserError(f"LoRA module {key!r} is not a known Wan Linear")
            name = kohya_name(path)
        suffix = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(kind, kind)
        out[f"{name}.{suffix}"] = value
    for name in {k.rsplit(".", 2)[0] for k in out if k.endswith(".lora_down.weight")}:
        down, up = out[f"{name}.lora_down.weight"], out.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"LoRA module {name} has a down weight but no up weight")
        if up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA module {name}: up {list(up.shape)} and down {list(down.shape)} ranks differ")
        out.setdefault(f"{name}.alpha", torch.tensor(float(down.shape[0])))
    for name, tensors in module_tensors(out).items():
        _check_lycoris(name, tensors)
        if "hada_w1_b" in tensors:
            out.setdefault(f"{name}.alpha", torch.tensor(float(tensors["hada_w1_b"].shape[0])))
        elif "lokr_w1" in tensors:  # no alpha means scale 1
            rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else 1
            out.setdefault(f"{name}.alpha", torch.tensor(float(rank)))
    return out


_REQUIRED = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


def _check_lycoris(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    kinds = [k for k, probe in (("lora", "lora_down.weight"), ("loha", "hada_w1_a"), ("lokr", "lokr_w1"))
             if probe in tensors]
    if len(kinds) != 1:
        found = ", ".join(sorted(tensors))
        raise UserError(f"adapter module {name} has no complete LoRA / LoHa / LoKr weights (found {found}); "
                        "LoKr files with a decomposed lokr_w1 (lokr_w1_a / lokr_w1_b) are not supported")
    missing = [k for k in _REQUIRED.get(kinds[0], ()) if k not in tensors]
    if kinds[0] == "lokr" and "lokr_w2" not in tensors and not {"lokr_w2_a", "lokr_w2_b"} <= set(tensors):
        missing.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
    if missing:
        raise UserError(f"adapter module {name} ({kinds[0]}) lacks {', '.join(missing)}")


def module_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya state dict -> module name -> {suffix: tensor} (``lora_down.weight``, ``hada_w1_a``, ``alpha``, ...)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _SUFFIX_RE.fullmatch(key)
        if m is not None:
            modules.setdefault(m.group(1), {})[m.group(2)] = value
    return modules


def adapter_type(sd: Mapping[str, torch.Tensor]) -> str:
    """What a kohya state dict holds: ``"lora"``, ``"loha"``, ``"lokr"`` (``+dora`` with DoRA magnitudes), or
    ``"mixed"``."""
    kinds = {adapter_kind(dict(t)) for t in module_tensors(sd).values()}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return kind + ("+dora" if any(k.endswith(".dora_scale") for k in sd) else "")


def from_kohya(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Convert kohya keys to ``layout``; the alpha / rank scale is folded into the down weights."""
    if layout == "kohya":
        return dict(sd)
    if layout not in LAYOUTS:
        raise UserError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    kind = adapter_type(sd)
    if kind != "lora" and layout == "diffusers":
        raise UserError(f"this file holds {kind} weights; diffusers' Wan loader reads plain LoRA only: use the kohya "
                        "or diffusion_model layout, or merge it into the DiT (tools/merge_lora.py)")
    out = {}
    if kind != "lora":  # ComfyUI reads the LyCORIS / DoRA names with a diffusion_model. prefix too, alpha kept
        for key, value in sd.items():
            name, suffix = _SUFFIX_RE.fullmatch(key).groups()
            out[f"diffusion_model.{kohya_to_path(name)}.{suffix}"] = value
        return out
    for name in sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}):
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        alpha = sd.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        path = kohya_to_path(name)
        prefix = "diffusion_model." + path if layout == "diffusion_model" else "transformer." + path_to_diffusers(path)
        out[f"{prefix}.lora_A.weight"] = (down.float() * scale).to(down.dtype)
        out[f"{prefix}.lora_B.weight"] = up
    return out


# -- files ------------------------------------------------------------------------------------------


def save_lora(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    dtype: str | torch.dtype = "bf16",
) -> None:
    """Write a kohya-layout LoRA atomically; weights in ``dtype``, ``.alpha`` always present and ``.alpha`` /
    ``.dora_scale`` in fp32.

    ``sshs_model_hash`` / ``sshs_legacy_hash`` are added as kohya's sd-scripts compute them (see
    ``networks.metadata.kohya_hashes``)."""
    from .metadata import kohya_hashes

    dtype = SAVE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    sd = to_kohya(state_dict, "kohya")
    tensors = {k: (v.float() if k.endswith(FP32_SUFFIXES) else v.to(dtype)).detach().cpu().contiguous()
               for k, v in sd.items()}
    meta = {}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"LoRA metadata value for {key!r} must be a string, got {type(value).__name__}")
        meta[key] = value
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    save_safetensors_atomic(tensors, path, metadata=meta)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for damaged files
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file of any supported layout -> (kohya state dict, metadata)."""
    sd, meta = read_safetensors(path)
    try:
        return to_kohya(sd), meta
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


# -- metadata ---------------------------------------------------------------------------------------

HASH_CHUNK = 1 << 20


def quick_file_hash(path: str | Path) -> str:
    """sha256 over the file size, its first MiB and its last MiB (fast on multi-GB checkpoints)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(HASH_CHUNK))
        if size > HASH_CHUNK:
            fh.seek(max(size - HASH_CHUNK, HASH_CHUNK))
            h.update(fh.read(HASH_CHUNK))
    return "0x" + h.hexdigest()


def build_lora_metadata(
    *,
    config_toml: str,
    network: Mapping[str, object],
    steps: int,
    epochs: int,
    target_model: str,
    base_model: str | Path | None = None,
    title: str = "wan_lora",
    resolution: tuple[int, int] | None = None,
    timestep_range: tuple[int, int] = (0, 1000),
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """``ss_*`` training facts and ``modelspec.*`` keys; every value a string.

    ``base_model``: the DiT file; its name and ``quick_file_hash`` (sha256 of size + first/last MiB)
    are recorded. ``network``: e.g. ``{"network_dim": 32, "network_alpha": 16, ...}``.
    """
    if target_model not in ("wan21", "wan22"):
        raise ValueError(f"target_model must be wan21 or wan22, got {target_model!r}")
    meta: dict[str, str] = {
        "ss_config_toml": config_toml,
        "ss_network_module": "networks.lora_wan",
        "ss_steps": str(steps),
        "ss_epoch": str(epochs),
        "ss_target_model": target_model,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "wan2.1/lora" if target_model == "wan21" else "wan2.2/lora",
        "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1" if target_model == "wan21"
        else "https://github.com/Wan-Video/Wan2.2",
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "modelspec.timestep_range": f"{timestep_range[0]},{timestep_range[1]}",
    }  # fmt: skip
    for key, value in network.items():
        meta[f"ss_{key}"] = str(value)
    if resolution is not None:
        meta["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    if base_model is not None:
        base_model = Path(base_model)
        meta["ss_base_model_name"] = base_model.name
        if base_model.is_file():
            meta["ss_base_model_hash"] = quick_file_hash(base_model)
    for key, value in (extra or {}).items():
        meta[key] = str(value)
    return meta
