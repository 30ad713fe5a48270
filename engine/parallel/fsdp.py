"""FSDP2 / HSDP, applied per transformer block from outside (activation checkpointing, which
runs inside each FSDP unit, is engine/parallel/activation_memory.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mixed_precision(dtype: str) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction; fp32 = no casting."""
    if dtype == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, blocks: nn.ModuleDict, mesh: DeviceMesh, dtype: str,
               experts: list[nn.Module] = (), expert_mesh: DeviceMesh | None = None,
               parts: list[nn.Module] = (), replicated: list[nn.Module] = (),
               replicate_mesh: DeviceMesh | None = None) -> None:
    """One FSDP unit per block plus the root (embeddings, final norm, head); expert weights
    (under expert parallelism) are their own units on the expert mesh; omni parts with the
    `fsdp` recipe are their own units; `replicated` parts (the `replicate` recipe) are units
    on `replicate_mesh`, whole on every rank.

    The gradient divide factor is 1: the training loss is already normalised by the global
    number of target tokens, so gradients must be summed over ranks, never averaged.
    """
    policy = mixed_precision(dtype)
    for module in experts:
        fully_shard(module, mesh=expert_mesh, mp_policy=policy)
    for module in parts:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    for module in replicated:
        assert replicate_mesh is not None and replicate_mesh.shape[-1] == 1
        fully_shard(module, mesh=replicate_mesh, mp_policy=policy)
    for name, block in blocks.items():
        # The last block's parameters are needed right away in backward: keep them gathered.
        last = name == list(blocks.keys())[-1]
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=not last)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # the trainer enters the model through loss_sums (the model contract), not __call__
    register_fsdp_forward_method(model, "loss_sums")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
