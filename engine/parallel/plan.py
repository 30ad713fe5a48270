"""Apply a parallel recipe to a model built on the meta device, in a fixed order.

1. attention hooks: the kernel, and the Ulysses forward when sp > 1,
2. activation checkpointing per block,
3. FSDP / HSDP per block, then the root.
Model code is never edited: only hooks and wrappers are set from here.
"""

from __future__ import annotations

import torch.nn as nn

from engine.config import Config
from engine.ops.attention import get_attention_fn

from .compile import apply_compile
from .dims import Meshes, ParallelDims
from .fsdp import apply_activation_checkpointing, apply_fsdp
from .ulysses import apply_ulysses


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, meshes: Meshes | None, device_type: str) -> nn.Module:
    model.set_attention_fn(get_attention_fn(cfg.model.attention_backend, device_type))
    if meshes is not None and dims.sp > 1:
        apply_ulysses(model.attention_modules(), meshes.sp, cfg.parallel.sp_async)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model.blocks)
    if cfg.train.compile:
        apply_compile(model.blocks)
    if meshes is not None and dims.fsdp_enabled:
        apply_fsdp(model, model.blocks, meshes.fsdp, cfg.train.dtype)
    return model
