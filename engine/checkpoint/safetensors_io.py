"""Streaming safetensors: read headers without touching data, write one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once (plus a bytes
copy of each). The format is simple enough to stream instead: an 8-byte little-endian
header length, a JSON header (name -> dtype, shape, byte offsets), then the raw bytes.
Since shapes and dtypes are known before any data is read, the header is written first
and each tensor is fetched, written and dropped in turn, so the peak memory of a
conversion is one tensor, not one file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[list[TensorSpec], dict[str, str]]:
    """Tensor specs (in file order) and the `__metadata__` of a safetensors file; reads only the header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes): re-save or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n}): re-save or re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} has a corrupt safetensors header: re-save or re-download it") from None
    metadata = header.pop("__metadata__", None) or {}
    specs = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in DTYPES:
            raise ValueError(f"tensor '{name}' in {path} has dtype {info['dtype']}, which this reader does not "
                             f"support (supported: {', '.join(DTYPES)}): convert it with transformers first")
        specs.append(TensorSpec(name, DTYPES[info["dtype"]], tuple(info["shape"])))
    return specs, metadata


def write_safetensors(path: Path, specs: list[TensorSpec], get_tensor: Callable[[str], torch.Tensor],
                      metadata: Optional[dict[str, str]] = None) -> int:
    """Write `specs` to `path`, calling `get_tensor(name)` once per tensor, in order. Returns bytes of data.

    Written to a temporary name and moved into place, so a crash never leaves a truncated file.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            t = get_tensor(s.name)
            assert t.dtype == s.dtype and tuple(t.shape) == s.shape, (s, t.dtype, t.shape)
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del t
    os.replace(tmp, path)
    return offset


def shard_groups(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_bytes` (a larger single tensor gets a file of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if groups[-1] and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    return [g for g in groups if g]


def shard_names(prefix: str, n: int) -> list[str]:
    """`prefix.safetensors`, or Hugging Face's `prefix-00001-of-0000n.safetensors` names."""
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(out_dir: Path, prefix: str, files: list[str], groups: list[list[TensorSpec]]) -> None:
    total = sum(s.nbytes for g in groups for s in g)
    weight_map = {s.name: f for f, g in zip(files, groups) for s in g}
    (Path(out_dir) / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '100MiB' -> 100 * 2**20, 1000 -> 1000 (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"size {text!r} is not understood: write it like 5GB, 500MB or 100MiB")
    return int(float(m.group(1)) * _UNITS[unit])
