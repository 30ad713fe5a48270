"""Per-part parallel recipes of an omni model, chosen in the config (`recipe:` of a part).

- `fsdp` (default): the part is its own FSDP unit, sharded over the same ranks as the
  backbone (dp_shard x sp, replicated over dp_replicate). It is gathered once per step
  when its `lm_encode` runs (parts are called through `__call__`, see `call_part`).
- `replicate`: the part stays whole on every rank (no gather at all: worth it for a small
  encoder). It is an FSDP unit on the `replicate` mesh (world x 1: HSDP whose shard
  axis is one rank wide), so FSDP applies the same mixed-precision policy as to every
  other unit (bf16 compute, fp32 master weights and reduction) and sums its gradients
  over the world after the last micro-batch.

Under Ulysses SP every rank of an SP group holds the same payloads, so each runs the
encoders on all of them, then keeps only the rows its sequence shard's placeholders need
(`ph_index`): the full-length embedding sequence is never built. The cost is encoder
compute and activations repeated sp times; decoders' code embeddings likewise.
Decoders' heads run inside the root unit (they are called twice per step).
"""

from __future__ import annotations

import torch.nn as nn

from engine.config import PART_RECIPES as RECIPES
from engine.config import ConfigError


def part_recipes(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(parts to shard as their own units, parts to keep replicated)."""
    units, replicated = [], []
    for name, part in model.parts().items():
        recipe = model.specs[name].get("recipe", "fsdp")
        kind, i = model._where[name]
        if recipe not in RECIPES:
            raise ConfigError(f"config key 'model.{kind}[{i}].recipe' ({name}): recipe {recipe!r} is unknown; use "
                              f"one of {', '.join(RECIPES)}")
        if name in model.decoders:
            if recipe != "fsdp":
                raise ConfigError(f"config key 'model.{kind}[{i}].recipe' ({name}): decoders support only recipe fsdp "
                                  "(they run in the root FSDP unit)")
            continue
        (units if recipe == "fsdp" else replicated).append(part)
    return units, replicated
