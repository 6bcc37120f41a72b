"""State folders: write them atomically, find the newest valid one, read one back.

A state folder ``{output_name}-step00000100-state/`` holds

- ``trainer_state.json``: step, epoch, counters, world size (human-readable);
- ``network_<name>.safetensors``: the trained network(s) in fp32;
- ``<object>.pt``: optimiser, scheduler and handler states (``torch.load(weights_only=True)``);
- ``rank<r>.pt``: per-process random-number generator states and data-loader position;
- ``sharded/`` (``distributed_engine = "fsdp"`` only, instead of the network and optimiser files): the trained
  weights and optimiser state as a ``torch.distributed.checkpoint`` folder, one file per process;
- ``config.toml``: the resolved config of the run;
- ``COMPLETE.json``: written last. A folder without it is half-written and never resumed from.

The folder is built under ``.<name>.tmp`` and renamed into place, so a crash never leaves a folder that looks
complete, and an older state is replaced only once the new one is whole.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..common.logger import get_logger
from ..errors import UserError
from ..utils.atomic import save_safetensors_atomic, torch_save_atomic, write_json_atomic, write_text_atomic

logger = get_logger(__name__)

MARKER = "COMPLETE.json"
FORMAT = 1
# ``-step00000100-state`` / ``-000002-state`` (epochs, as kohya names them; ``-epoch000002`` from older runs)
_STATE_RE = re.compile(r"^(?P<base>.+)-(?P<kind>step|epoch)?(?P<num>\d+)-state$")
_KIND_PATTERNS = {"step": r"step(\d+)", "epoch": r"(?:epoch)?(\d+)"}


@dataclass
class StatePayload:
    """What goes into (or came out of) a state folder."""

    info: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    rank_objects: dict[int, Any] = field(default_factory=dict)
    config_text: str = ""


def save_name(output_name: str, *, step: int | None = None, epoch: int | None = None, suffix: str = "") -> str:
    """``{output_name}{suffix}-step00000100`` / ``-000002`` (epoch 2, kohya's and musubi-tuner's name) / the plain
    final name (no extension)."""
    base = f"{output_name}{suffix}"
    if step is not None:
        return f"{base}-step{step:08d}"
    if epoch is not None:
        return f"{base}-{epoch:06d}"
    return base


def tmp_folder_for(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def begin_state_folder(final: Path) -> Path:
    """Create an empty temporary folder for ``final`` (main process only)."""
    tmp = tmp_folder_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_part(tmp: Path, rank: int, obj: Any) -> None:
    torch_save_atomic(obj, tmp / f"rank{rank}.pt")


def write_main_part(tmp: Path, payload: StatePayload) -> None:
    for name, tensors in payload.tensors.items():
        save_safetensors_atomic({k: v.detach().float().cpu() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    for name, obj in payload.objects.items():
        torch_save_atomic(obj, tmp / f"{name}.pt")
    write_json_atomic(tmp / "trainer_state.json", payload.info)
    if payload.config_text:
        write_text_atomic(tmp / "config.toml", payload.config_text)


def finish_state_folder(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """Write the marker, then move the folder into place (replacing an older folder of the same name)."""
    files = sorted(p.name for p in tmp.iterdir())
    write_json_atomic(tmp / MARKER, {"format": FORMAT, "step": info["step"], "epoch": info["epoch"], "files": files})
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def is_valid_state(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all((folder / name).exists() for name in data.get("files", [])) and "step" in data


def find_latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The valid state folder of ``output_name`` with the highest step; half-written ones are skipped."""
    if not output_dir.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for folder in sorted(output_dir.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith(f".{output_name}-") and folder.name.endswith("-state.tmp"):
            logger.warning("ignoring half-written state folder %s", folder)
            continue
        match = _STATE_RE.match(folder.name)
        if match is None or match["base"] != output_name:
            continue
        if not is_valid_state(folder):
            logger.warning("ignoring incomplete state folder %s (no valid %s)", folder, MARKER)
            continue
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        key = (int(marker["step"]), int(marker.get("epoch", 0)), folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def read_state_folder(folder: Path, rank: int, world_size: int) -> StatePayload:
    """Load a complete state folder; raises ``UserError`` when it is not resumable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"`resume`: state folder not found: {folder}")
    if not is_valid_state(folder):
        raise UserError(f"`resume`: {folder} is incomplete (no valid {MARKER}); pick another state folder")
    info = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    saved_world = int(info.get("world_size", 1))
    if saved_world != world_size:
        raise UserError(
            f"`resume`: {folder} was saved by {saved_world} process(es) but this run has {world_size}; "
            "resume with the same number of processes"
        )
    payload = StatePayload(info=info)
    for path in sorted(folder.glob("*.safetensors")):
        payload.tensors[path.stem] = load_file(str(path))
    for path in sorted(folder.glob("*.pt")):
        if path.name.startswith("rank"):
            continue
        payload.objects[path.stem] = torch.load(path, map_location="cpu", weights_only=True)
    payload.rank_objects[rank] = torch.load(folder / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    config = folder / "config.toml"
    payload.config_text = config.read_text(encoding="utf-8") if config.is_file() else ""
    return payload


def saved_steps(output_dir: Path, output_name: str, kind: str) -> dict[int, list[Path]]:
    """Every ``-step`` / ``-epoch`` save of ``output_name`` (LoRA files, the enhancements' files beside them such
    as ``-ema``, their loss plots and state folders) by number."""
    pattern = re.compile(
        rf"^{re.escape(output_name)}(?:_high_noise|_low_noise)?-{_KIND_PATTERNS[kind]}(?:(?:-[a-z][a-z0-9_]*)?\.safetensors|-state|_loss\.png)$"
    )
    found: dict[int, list[Path]] = {}
    if not output_dir.is_dir():
        return found
    for path in output_dir.iterdir():
        match = pattern.match(path.name)
        if match:
            found.setdefault(int(match[1]), []).append(path)
    return found


def remove_saves(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        logger.info("removed old save %s", path.name)


def payload_from_state(sd: dict[str, Any], config_text: str = "") -> StatePayload:
    """Split a ``Trainer.state_dict()`` into the files of a state folder (the rank part is written separately)."""
    state = sd["state"]
    info = {
        "format": FORMAT,
        "step": state["step"],
        "epoch": state["epoch"],
        "world_size": sd["world_size"],
        "engine": sd["engine"],
        "state": state,
        "group_steps": sd["group_steps"],
    }
    payload = StatePayload(info=info, config_text=config_text)
    for name, tensors in sd["networks"].items():
        payload.tensors[f"network_{name}"] = tensors
    for name, obj in sd["optimizers"].items():
        payload.objects[f"optimizer_{name}"] = obj
    for name, obj in sd["schedulers"].items():
        payload.objects[f"scheduler_{name}"] = obj
    payload.objects["handlers"] = sd["handlers"]
    payload.objects["enhancements"] = sd["enhancements"]
    return payload


def state_from_payload(payload: StatePayload, rank: int) -> dict[str, Any]:
    """The inverse of ``payload_from_state`` for process ``rank``."""
    info = payload.info

    def strip(prefix: str, source: dict[str, Any]) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}

    return {
        "world_size": info["world_size"],
        "engine": info.get("engine", "ddp"),
        "state": info["state"],
        "group_steps": info.get("group_steps", {}),
        "networks": strip("network_", payload.tensors),
        "optimizers": strip("optimizer_", payload.objects),
        "schedulers": strip("scheduler_", payload.objects),
        "handlers": payload.objects.get("handlers", {}),
        "enhancements": payload.objects.get("enhancements", {}),
        "rank": payload.rank_objects[rank],
    }
