"""Strict name-and-shape matching of tensors offered for a module (weight loaders, state
copies): one error format for every loader, naming the tensors and both shapes."""

from __future__ import annotations

from typing import Mapping

import torch


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    return str(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")


def check_tensors(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], where: str, *,
                  strict: bool = True, prefix: str = "", fix: str = "") -> None:
    """ValueError unless every name in `given` is in `own` with the same shape (and, when
    `strict`, every name of `own` is given). `prefix` is how `given`'s names appear in the
    source; `fix` ends each message with what to do."""
    missing = sorted(own.keys() - given.keys()) if strict else []
    unexpected = sorted(given.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{where} (prefix {prefix!r}) does not match: missing {_names(missing)}, "
                         f"unexpected {_names(unexpected)}{fix}")
    for name, tensor in given.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{where}: tensor {prefix}{name} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(own[name].shape)} in the module{fix}")
