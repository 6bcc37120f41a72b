"""What a saved LoRA says about itself: no machine paths by default, publish keys, kohya's sshs hashes,
no training metadata on request."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import torch
from safetensors.torch import load_file, save

from train_support import load
from wantrainer.core.wan_network_trainer import build_trainer
from wantrainer.networks.formats import read_safetensors, save_lora


def _kohya_reference_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' library/train_util.py, written out step by step: precalculate_safetensors_hashes keeps the
    ss_* metadata, serialises with safetensors.torch.save, then addnet_hash_safetensors (sha256 from the end
    of the header, read in 1 MiB blocks) and addnet_hash_legacy (sha256 of 0x10000 bytes at 0x100000, 8 hex)."""
    kept = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = io.BytesIO(save(tensors, kept))
    model = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[0:8]


def _header(path) -> dict:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size))


def test_sshs_hashes_match_kohyas_definition(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(6):  # > 1 MiB of tensors, so the legacy hash reads real data
        sd[f"lora_unet_blocks_{i}_self_attn_q.lora_down.weight"] = torch.randn(32, 1536, generator=gen)
        sd[f"lora_unet_blocks_{i}_self_attn_q.lora_up.weight"] = torch.randn(1536, 32, generator=gen)
    meta = {"ss_network_dim": "32", "modelspec.title": "t", "ss_config_toml": "x = 1\n"}
    path = tmp_path / "l.safetensors"
    save_lora(path, sd, meta, dtype="bf16")
    tensors, written = read_safetensors(path)
    assert set(written) == set(meta) | {"sshs_model_hash", "sshs_legacy_hash"}
    want = _kohya_reference_hashes(load_file(str(path)), written)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == want
    # the model hash does not depend on the header: it is the sha256 of the file's tensor bytes
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(raw[start:]).hexdigest()
    assert len(written["sshs_legacy_hash"]) == 8 and written["sshs_legacy_hash"] != want[0][:8]


def _trained(train_workspace, tmp_path, **values):
    path = train_workspace.write(tmp_path, max_train_steps=2, log_with="none", **values)
    assert build_trainer(load(path)).train() == "completed"
    return tmp_path / "out" / "lora.safetensors"


def test_no_machine_paths_by_default_and_publish_keys(train_workspace, tmp_path):
    lora = _trained(train_workspace, tmp_path / "a", metadata_author="Jo", metadata_license="apache-2.0",
                    metadata_tags=["style", "ink"], metadata_trigger_words=["inkstyle"],
                    metadata_description="ink drawings")
    _, meta = read_safetensors(lora)
    folders = {str(train_workspace.root), str(train_workspace.kit.dit_wan21.parent), str(tmp_path)}
    leaked = [k for k, v in meta.items() for folder in folders if folder in v]
    assert not leaked, leaked
    assert 'dit = "dit_wan21.safetensors"' in meta["ss_config_toml"]
    assert 'cache_directory = "train_cache"' in meta["ss_config_toml"]
    assert meta["modelspec.author"] == "Jo" and meta["modelspec.license"] == "apache-2.0"
    assert meta["modelspec.tags"] == "style,ink" and meta["modelspec.trigger_phrase"] == "inkstyle"
    assert meta["modelspec.description"] == meta["ss_training_comment"] == "ink drawings"
    assert meta["modelspec.title"] == "lora" and len(meta["sshs_model_hash"]) == 64

    full = _trained(train_workspace, tmp_path / "b", metadata_full_paths=True, metadata_title="Ink")
    _, meta = read_safetensors(full)
    assert f'dit = "{train_workspace.kit.dit_wan21}"' in meta["ss_config_toml"]
    assert meta["modelspec.title"] == "Ink"


def test_no_metadata_writes_no_training_facts(train_workspace, tmp_path):
    plain = _trained(train_workspace, tmp_path / "a")
    bare = _trained(train_workspace, tmp_path / "b", no_metadata=True, metadata_author="Jo")
    _, meta = read_safetensors(bare)
    assert not [k for k in meta if k.startswith("ss_")]
    assert set(meta) == {"modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                         "modelspec.title", "modelspec.author", "sshs_model_hash", "sshs_legacy_hash"}
    assert "__metadata__" in _header(bare)
    # switched off, the weights are the same bit for bit
    a, b = load_file(str(plain)), load_file(str(bare))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_safetensors(plain)[1]["sshs_model_hash"] == meta["sshs_model_hash"]
