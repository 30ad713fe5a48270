"""The engine's one reader of safetensors weights on disk (checkpoint loading and the
modalities' own Hugging Face loaders alike): which files hold a folder's model, and lazy
reads of tensors by name, one file open at a time. Never pickles, never remote code.

Kept outside `engine.checkpoint` so that the modalities, which may not import the
checkpoint layer, read weights through the same code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch


class TensorFileError(ValueError):
    """A folder or file that holds no readable safetensors weights; one line with the fix."""


def model_files(folder: str | Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a folder's model: `PREFIX.safetensors.index.json`'s shards,
    `PREFIX.safetensors`, or `PREFIX-0000i-of-0000n.safetensors` shards without their index
    (all n must be there). Empty when the folder has none of them."""
    folder = Path(folder)
    index = folder / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise TensorFileError(f"{index} is not a valid safetensors index (no weight_map): re-download or re-save "
                                  "the model") from None
        where = index.name
    elif (folder / f"{prefix}.safetensors").is_file():
        return [folder / f"{prefix}.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob(f"{prefix}-*-of-*.safetensors"))
        if not found:
            return []
        n = int(re.search(r"-of-(\d+)\.safetensors$", found[0]).group(1))
        names = [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        where = f"the shard names ({found[0]})"
    for name in names:
        if not (folder / name).is_file():
            raise MissingShardError(f"shard {name} listed by {where} is missing from {folder}: copy or download it "
                                    "again (every shard of the checkpoint is needed)")
    return [folder / n for n in names]


class MissingShardError(TensorFileError):
    pass


class TensorFiles:
    """Tensors of some safetensors files by name, read lazily (headers only until `get`)."""

    def __init__(self, files: Iterable[str | Path]):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self.where: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    self.where.update({k: f for k in sf.keys()})
            except Exception as e:  # safetensors raises its own error types for broken files
                raise TensorFileError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:100]}): "
                                      "re-save or re-download it") from None
        self._handle: Optional[tuple[Path, object]] = None

    @classmethod
    def of(cls, source: str | Path, prefix: str = "model") -> "TensorFiles":
        """A safetensors file, or a folder: its model files (`model_files`), else every
        `*.safetensors` in it."""
        path = Path(source)
        if path.is_file():
            return cls([path])
        if not path.is_dir():
            raise TensorFileError(f"{path} does not exist: pass a safetensors file or a folder holding some")
        files = model_files(path, prefix) or sorted(path.glob("*.safetensors"))
        if not files:
            raise TensorFileError(f"{path} has no *.safetensors files: save the weights with safetensors")
        return cls(files)

    def keys(self) -> list[str]:
        return list(self.where)

    def _open(self, file: Path):
        from safetensors import safe_open

        if self._handle is None or self._handle[0] != file:
            self._handle = (file, safe_open(str(file), framework="pt"))
        return self._handle[1]

    def get(self, key: str) -> torch.Tensor:
        return self._open(self.where[key]).get_tensor(key)

    def rows(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a tensor, without reading the others."""
        return self._open(self.where[key]).get_slice(key)[first:last]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[key]).get_slice(key).get_shape())

    def read(self, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with one of `prefixes`, in file order."""
        return {k: self.get(k) for k in self.where if k.startswith(prefixes)}
