"""Computation-only backbones, built by registered name. No torch.distributed here."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from engine.config import ModelConfig

from .dense import DenseTransformer
from .moe import MoETransformer

BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {"dense": DenseTransformer, "moe": MoETransformer}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone={cfg.backbone!r} is not registered; choose one of {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg)
