"""Apply a parallel recipe to a model built on the meta device, in a fixed order.

1. attention hooks: the kernel (the vision towers' too), and the Ulysses forward when sp > 1,
2. MoE hooks: router statistics reduced over the global batch; under EP, experts sharded
   (still on meta) and the all-to-all dispatcher set,
   then, with train.dtype=fp8, float8 linear layers (engine/parallel/float8.py),
3. activation checkpointing (none / full / selective) per block, and per part on its repeated layers
   (engine/parallel/activation_memory.py),
4. torch.compile per block (optional),
5. FSDP / HSDP per block, then the root; expert weights on their own (ep_fsdp) mesh;
   omni parts by their recipe (engine/parallel/part_recipes.py).
Activation offload (optional) wraps the model's forward (loss_sums) with saved-tensor hooks.
Model code is never edited: only hooks and wrappers are set from here.
"""

from __future__ import annotations

import torch.nn as nn

from engine.config import Config, checkpointing_mode
from engine.modalities.vision import VisionAttention
from engine.ops.attention import HALF_PRECISION, get_attention_fn, make_vision_varlen_attention, resolve_backend

from .activation_memory import apply_activation_offload, apply_block_checkpointing, apply_part_checkpointing
from .compile import apply_compile
from .dims import Meshes, ParallelDims
from .expert_parallel import apply_expert_parallel, apply_router_stats_reduction
from .float8 import apply_float8, high_precision
from .fsdp import apply_fsdp
from .transformer_engine import apply_fp8_autocast, apply_transformer_engine
from .part_recipes import part_recipes
from .ulysses import apply_ulysses


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, meshes: Meshes | None, device_type: str) -> nn.Module:
    dtype = high_precision(cfg.train.dtype, device_type)  # fp8: what the float8 layers leave out
    model.set_attention_fn(get_attention_fn(cfg.model.attention_backend, device_type, dtype))
    if resolve_backend(cfg.model.attention_backend, device_type, dtype) in ("varlen", "flash_attn"):
        # the vision towers' per-image (per-window) attention takes the varlen kernel too
        vision_fn = make_vision_varlen_attention(HALF_PRECISION[dtype])
        for module in model.modules():
            if isinstance(module, VisionAttention):
                module.attention_fn = vision_fn
    if meshes is not None and dims.sp > 1:
        apply_ulysses(model.attention_modules(), meshes.sp, cfg.parallel.sp_async)
    moe_layers = model.moe_layers()
    if meshes is not None and moe_layers:
        # every rank holds distinct tokens of the global batch: the default (world) group
        apply_router_stats_reduction(moe_layers, None, dims.world_size)
        if dims.ep > 1:
            apply_expert_parallel(moe_layers, meshes.ep, cfg.model.num_experts,
                                  cfg.parallel.ep_chunks if cfg.parallel.ep_overlap else 1)
    if cfg.train.dtype == "fp8" and cfg.train.fp8_backend == "torchao":  # before AC, compile and FSDP wrap them
        apply_float8(model, cfg, device_type, meshes is not None and dims.fsdp_enabled)
    if cfg.train.dtype == "fp8" and cfg.train.fp8_backend == "te":  # likewise: TE's modules, under its autocast
        apply_transformer_engine(model)
        apply_fp8_autocast(model, cfg)
    # checkpointing before compile (the checkpoint is traced with the block) and FSDP (it runs inside the unit)
    apply_block_checkpointing(model.blocks, checkpointing_mode(cfg.parallel.activation_checkpointing,
                                                               "parallel.activation_checkpointing"))
    apply_part_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model.blocks)
    if cfg.parallel.activation_offload:  # around the whole forward; FSDP's forward method wraps it
        apply_activation_offload(model)
    if meshes is not None and dims.fsdp_enabled:
        experts = [m.experts for m in moe_layers.values()] if dims.ep > 1 else []
        units, replicated = part_recipes(model)
        replicate_mesh = dims.build_replicate_mesh(device_type) if replicated else None
        apply_fsdp(model, model.blocks, meshes.fsdp, dtype, experts, meshes.expert_fsdp, units,
                   replicated, replicate_mesh)
    return model
