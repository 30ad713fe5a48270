"""The one chain by which weights reach a model, after it is parallelised on the meta device:

1. seeded init: every tensor from a generator seeded by (train.seed, its name), so every
   layout starts from the same weights (engine.parallel.init.materialize);
2. `model.init_from`: the backbone (a Hugging Face or imported folder);
3. each part's `init_from` (its own Hugging Face loader; a dataset's prepare step may have
   set it to weights it made, e.g. omni-digits' VQ tokenizer);
4. resume: the checkpoint manager replaces all of it (so 2 and 3 are skipped then).

Nothing else writes weights: no data source, no tool.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from engine.config import Config, expand_path
from engine.models.omni import OmniModel
from engine.parallel import materialize
from engine.parallel.init import load_full_state_

from . import janus, qwen2_vl
from .hf import load_weights_
from .manager import CheckpointError

log = logging.getLogger(__name__)


def initial_weights_(model: nn.Module, cfg: Config, device: torch.device, resuming: bool) -> None:
    """Steps 1-3 of the chain (1 only when a checkpoint will be resumed)."""
    materialize(model, device, cfg.train.seed)
    if resuming:
        return
    if cfg.model.init_from and janus.is_janus(expand_path(cfg.model.init_from)):  # the whole Janus model
        read = janus.load_weights_(model, expand_path(cfg.model.init_from))
        log.info("whole model from init_from=%s: this rank read %.2f MB", cfg.model.init_from, read / 1e6)
    elif cfg.model.init_from and qwen2_vl.family_of(expand_path(cfg.model.init_from)):  # the whole omni model
        read = qwen2_vl.load_weights_(model, expand_path(cfg.model.init_from))
        log.info("whole model from init_from=%s: this rank read %.2f MB", cfg.model.init_from, read / 1e6)
    elif cfg.model.init_from:  # the backbone (inside the omni model when it has parts); each rank keeps its shards
        backbone = model.backbone if isinstance(model, OmniModel) else model
        load_weights_(backbone, expand_path(cfg.model.init_from), expect=cfg.model)
    for spec in [*cfg.model.encoders, *cfg.model.decoders]:
        if spec.get("init_from"):
            load_part_weights_(model, spec["name"], spec["init_from"])


def compose_from_init_from(cfg: Config) -> Config:
    """The run config with the model a whole released checkpoint in `model.init_from`
    describes (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni's thinker or whole model: its thinker; Janus);
    other configs unchanged (their init_from is checked against them)."""
    if cfg.model.init_from and janus.is_janus(expand_path(cfg.model.init_from)):
        cfg = copy.deepcopy(cfg)
        cfg.model = janus.compose_model_config(cfg.model)
        log.info("model composed from %s/config.json: %s", cfg.model.init_from, janus.ARCHITECTURE)
        return cfg
    family = qwen2_vl.family_of(expand_path(cfg.model.init_from)) if cfg.model.init_from else None
    if family is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model = qwen2_vl.compose_model_config(cfg.model)
    log.info("model composed from %s/config.json: %s", cfg.model.init_from, family.architecture)
    return cfg


def load_part_weights_(model: nn.Module, name: str, source: str) -> None:
    """The part's own Hugging Face loader fills an unsharded CPU copy, then every rank keeps
    its shard of each tensor the loader set. Costs one full copy of the part per rank while
    it loads (parts are at most ~1B)."""
    path = expand_path(source)
    where = f"model part {name!r} init_from={path}"
    if not path.exists():
        raise CheckpointError(f"{where}: no such file or directory; point init_from at a Hugging Face "
                              "folder (or state-dict file) of this part")
    with torch.device("cpu"):
        full = model.build_unsharded_part(name)
    try:
        loaded = full.load_hf_weights(path)  # a list when the loader fills only some tensors
        tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
        if isinstance(loaded, list):
            tensors = {k: tensors[k] for k in loaded}
        load_full_state_(model.part(name), {k: v.detach() for k, v in tensors.items()}, where,
                         strict=not isinstance(loaded, list))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    log.info("part %s: %d tensors from init_from=%s", name, len(tensors), path)
