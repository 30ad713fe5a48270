"""AdamW (fused where the device supports it), warmup + cosine LR, global-norm clipping."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from engine.comm import all_reduce
from engine.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only; norms, biases and scalars are not decayed."""
    # Plain tensors (replicated parts) and DTensors (sharded) cannot share one fused call.
    groups: dict[tuple[bool, bool], list] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
              for (decay, _), params in sorted(groups.items())]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernel unsupported for this device / tensor type
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine to `cfg.steps`, positioned at `start_step` optimizer steps taken.

    The schedule is a function of the config and the step only: a resumed run rebuilds it
    from the *current* config (so `train.steps` or `train.lr` may change on resume: an
    extended run follows its own schedule) instead of loading the saved scheduler state,
    and sets the optimizer's learning rate to the value at `start_step`."""
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(step: int) -> float:  # `step` = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:  # the base LR is the config's, not one a checkpoint restored
        group["initial_lr"] = cfg.lr
    # last_epoch=start_step-1: LambdaLR's initial step lands on start_step and sets each group's lr.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.stack([g.double().pow(2).sum() for g in grads]).sum().reshape(1)


def _replicas(t: DTensor) -> int:
    """How many ranks hold each element of a DTensor: the product of its replicated axes."""
    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Global L2 norm over every rank's gradient shards, then clip in place.

    Parameters live on different meshes (experts on the EP mesh, replicated parts on the
    replicate mesh, the rest on the FSDP mesh), so the norm is summed from local shards
    over the whole world, each shard's square divided by the number of ranks that hold
    the same elements (its replicated mesh axes). Plain tensors (one process) count once.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    by_replicas: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            by_replicas.setdefault(_replicas(g), []).append(g.to_local())
    sharded_sq = _sum_sq([], device)
    for r, local in by_replicas.items():
        sharded_sq += _sum_sq(local, device) / r
    if by_replicas:
        all_reduce(sharded_sq, axis="world")
    whole = [g for g in grads if not isinstance(g, DTensor)]
    total = float(sharded_sq.item() + _sum_sq(whole, device).item()) ** 0.5
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if max_norm > 0 and total > max_norm:
        torch._foreach_mul_(locals_, max_norm / (total + 1e-6))
    return total
