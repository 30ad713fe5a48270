"""Materialise a meta-device model shard by shard, identically for every layout.

Each parameter is filled from a generator seeded by (seed, parameter name), so rank r of
an FSDP run holds exactly the rows that the one-process model has. Like Megatron's CPU
initialisation, one full parameter at a time is generated and sliced (the peak is the
largest single tensor, never the whole model).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from engine.models.moe import Experts
from engine.tensor_match import check_tensors


def _clean(name: str) -> str:
    # Wrappers (activation checkpointing, compile) add prefixes that must not change seeds.
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _params_with_global_rows(model: nn.Module):
    """(name, param, (global shape, first row) or None) for every parameter. Expert
    parallelism keeps a block of rows of a larger tensor and records it in `global_rows`."""
    for mod_name, module in model.named_modules():
        rows = module.global_rows if isinstance(module, Experts) else {}
        for pname, param in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{pname}" if mod_name else pname), param, rows.get(pname)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- the full tensor; an FSDP (DTensor) parameter keeps only its own shard.
    src_data_rank=None: every rank already holds the same full tensor, so no communication."""
    if isinstance(param, DTensor):
        full = full.to(device=param.device, dtype=param.dtype)
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """[first, last) rows of the full tensor that this rank's shard of `param` holds, when it
    is sharded along dim 0 only (FSDP; HSDP's replicate axis keeps whole shards): a loader
    then reads only those rows. None for a plain tensor or another placement."""
    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in param.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])


@torch.no_grad()
def load_full_state_(module: nn.Module, state: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """module's parameters and buffers <- the full tensors of `state` (same names and shapes;
    strict: every tensor of the module), each rank keeping its own shard of a sharded
    parameter. `where` names the module and how to fix a mismatch in errors."""
    own = {_clean(n): t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    check_tensors(own, state, where, strict=strict)
    for name, full in state.items():
        copy_full_(own[name], full)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    model.to_empty(device=device)
    for name, param, rows in _params_with_global_rows(model):
        name = _clean(name)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape, first = rows if rows is not None else (param.shape, 0)
        full = torch.empty(shape, dtype=torch.float32)
        model.init_param_(name, full, gen)
        if rows is not None:  # this rank's experts: the rows it owns of the global tensor
            full = full[first:first + param.shape[0]]
        copy_full_(param, full)
    for module in model.modules():
        if hasattr(module, "reset_buffers") and module is not model:
            module.reset_buffers()
