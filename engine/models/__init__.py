"""Computation-only backbones, built by registered name. No torch.distributed here."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from engine.config import ModelConfig

from .contract import TrainableModel
from .dense import DenseTransformer
from .moe import MoETransformer
from .omni import OmniModel, PartLayout, part_layout, placeholder_ids, text_vocab_size
from .part_specs import RESERVED_KEYS

__all__ = ["BACKBONES", "RESERVED_KEYS", "DenseTransformer", "MoETransformer", "OmniModel", "PartLayout",
           "TrainableModel", "build_backbone", "build_model", "part_layout", "placeholder_ids", "text_vocab_size"]

BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {"dense": DenseTransformer, "moe": MoETransformer}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The backbone alone, or the omni model around it when parts are configured."""
    backbone = build_backbone(cfg)
    if not (cfg.encoders or cfg.decoders):
        return backbone
    from engine.plugins import load_plugins

    load_plugins(cfg.plugins, "model.plugins")
    return OmniModel(cfg, backbone)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"model.backbone={cfg.backbone!r} is not registered; choose one of {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone](cfg)
