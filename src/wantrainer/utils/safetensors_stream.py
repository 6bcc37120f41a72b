"""Read and write .safetensors one tensor at a time, with plain file reads and writes (no mmap).

``safe_open`` memory-maps the whole file, and every page it touches counts in the process's resident set until the
file is closed; for a 28 GB checkpoint that is 28 GB of RSS. Here each tensor is read with ``readinto`` into its own
buffer and written straight to the output file, so the resident memory is bounded by the largest tensor (and its
converted copy), whatever the file size. The layout follows the format: an 8-byte little-endian header length, a
JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__``) padded with spaces to 8 bytes, then
the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .atomic import atomic_path

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


def read_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(name -> stored tensor, metadata) from the header only."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    start = 8 + size
    tensors = {
        name: StoredTensor(name, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0],
                           start + info["data_offsets"][1])
        for name, info in header.items()
    }  # fmt: skip
    return tensors, meta


def read_tensor(fh, stored: StoredTensor) -> torch.Tensor:
    """One tensor, read from the open file ``fh`` into a fresh buffer."""
    if stored.dtype not in DTYPES:
        raise UserError(f"tensor {stored.name}: dtype {stored.dtype} is not supported")
    buffer = torch.empty(stored.end - stored.begin, dtype=torch.uint8)
    fh.seek(stored.begin)
    if fh.readinto(memoryview(buffer.numpy())) != buffer.numel():
        raise UserError(f"tensor {stored.name}: the file ends early (truncated download?)")
    return buffer.view(DTYPES[stored.dtype]).reshape(stored.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor: its name, dtype and shape (known before any data is read)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def write_streamed(
    target: str | Path,
    planned: list[PlannedTensor],
    produce: Callable[[], Iterable[tuple[str, torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``planned`` tensors atomically; ``produce()`` yields ``(name, tensor)`` in the same order."""
    header: dict[str, object] = {}
    offset = 0
    for item in planned:
        nbytes = torch.Size(item.shape).numel() * torch.empty((), dtype=item.dtype).element_size()
        header[item.name] = {"dtype": NAMES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for item, (name, tensor) in zip(planned, produce(), strict=True):
            if name != item.name or tensor.dtype != item.dtype or tuple(tensor.shape) != item.shape:
                raise RuntimeError(f"tensor {name} {tensor.dtype} {list(tensor.shape)} does not match the plan "
                                   f"{item.name} {item.dtype} {list(item.shape)}")
            out.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
