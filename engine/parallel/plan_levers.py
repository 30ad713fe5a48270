"""What to change when a layout does not fit: single config changes (activation checkpointing,
no gradient accumulation, the encoders' own checkpointing, more sharding, more SP or EP,
activation offload), each planned with engine/parallel/memory_plan.py, then the greedy
combination (the change that lowers the peak most, again, until the layout fits). The global
batch is the training recipe's: a smaller one is listed but never combined."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from engine.config import Config, ConfigError, checkpointing_mode, resolve_layout
from engine.models import build_model
from engine.models.part_specs import part_specs

from .memory_plan import GiB, plan_layout


def _with(cfg: Config, **changes) -> Config:
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(new, section), name, value)
    return new


def find_levers(cfg: Config, world: int, device_memory_gb: float, payload_tokens: dict | None = None,
                model: nn.Module | None = None) -> list[dict]:
    """Single config changes that lower the peak, each with the resulting peak and whether it
    fits: activation checkpointing, a smaller micro-batch (down to 1 and no accumulation
    buffers when the per-rank batch is 1), more sharding (dp_replicate folded into dp_shard),
    more sequence parallelism, more expert parallelism."""
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg.model)
    p, layout = cfg.parallel, resolve_layout(cfg, world)
    candidates: list[tuple[str, Config]] = []
    mode = checkpointing_mode(p.activation_checkpointing, "parallel.activation_checkpointing")
    for better in {"none": ("selective", "full"), "selective": ("full",), "full": ()}[mode]:
        candidates.append((f"parallel.activation_checkpointing={better}",
                           _with(cfg, parallel__activation_checkpointing=better)))
    micro, local = layout["micro_batch"], layout["local_batch"]
    if micro > 1:
        candidates.append(("data.micro_batch_size=1", _with(cfg, data__micro_batch_size=1)))
    if layout["grad_accum"] > 1:
        # accumulation keeps unsharded gradients between micro-batches: one micro-batch per step
        candidates.append((f"data.micro_batch_size={local} (no gradient accumulation)",
                           _with(cfg, data__micro_batch_size=local)))
        candidates.append((f"data.global_batch_size={layout['dp'] * micro} (no gradient accumulation, smaller "
                           "global batch)", _with(cfg, data__global_batch_size=layout["dp"] * micro)))
    for kind, i, spec in part_specs(cfg.model):
        key = f"model.{kind}[{i}].activation_checkpointing"
        if kind == "encoders" and checkpointing_mode(spec.get("activation_checkpointing", False), key) != "full":
            new = copy.deepcopy(cfg)
            new.model.encoders[i] = {**spec, "activation_checkpointing": "full"}
            candidates.append((f"{key}=full ({spec['name']})", new))
    if p.dp_replicate > 1:
        candidates.append(("parallel.dp_replicate=1 (shard over every rank)",
                           _with(cfg, parallel__dp_replicate=1, parallel__dp_shard=-1)))
    sp = p.sp_size * 2
    if cfg.model.num_heads % sp == 0 and world % (p.dp_replicate * sp) == 0:
        candidates.append((f"parallel.sp_size={sp}", _with(cfg, parallel__sp_size=sp, parallel__dp_shard=-1)))
    if cfg.model.backbone == "moe" and cfg.model.num_experts % (p.ep_size * 2) == 0:
        candidates.append((f"parallel.ep_size={p.ep_size * 2}", _with(cfg, parallel__ep_size=p.ep_size * 2)))
    if not p.activation_offload:
        candidates.append(("parallel.activation_offload=true (CUDA)", _with(cfg, parallel__activation_offload=True)))
    out = []
    for what, new in candidates:
        try:
            result = plan_layout(new, world, device_memory_gb, payload_tokens, model=model)
        except ConfigError as e:
            out.append({"change": what, "error": str(e)})
            continue
        out.append({"change": what, "peak_gb": result["peak_bytes"] / GiB, "fits": result["fits"]})
    # together: greedily, the change that lowers the peak most, until the layout fits
    combined, applied, best = cfg, [], None
    pool = [(what, new) for what, new in candidates if "smaller global batch" not in what]  # keep the recipe
    while pool:
        trials = []
        for what, new in pool:
            try:
                trial = _merge(combined, new, cfg)
                trials.append((plan_layout(trial, world, device_memory_gb, payload_tokens, model=model)["peak_bytes"], what, trial))
            except ConfigError:
                continue
        if not trials:
            break
        peak, what, trial = min(trials, key=lambda x: x[0])
        if best is not None and peak >= best:
            break
        combined, best = trial, peak
        applied.append(what)
        pool = [(w, n) for w, n in pool if w != what]
        if peak <= device_memory_gb * GiB:
            break
    if len(applied) > 1 or (applied and best is not None and best > device_memory_gb * GiB):
        out.append({"change": " + ".join(applied), "peak_gb": best / GiB, "fits": best <= device_memory_gb * GiB})
    return out


def _merge(base: Config, new: Config, original: Config) -> Config:
    """`base` with every field where `new` differs from `original` taken from `new`."""
    merged = copy.deepcopy(base)
    for section in ("model", "parallel", "data", "train"):
        a, b = getattr(new, section), getattr(original, section)
        for key, value in vars(a).items():
            if getattr(b, key) != value:
                setattr(getattr(merged, section), key, value)
    return merged
