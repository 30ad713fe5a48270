"""Per-part parallel recipes of an omni model, chosen in the config (`recipe:` of a part).

- `fsdp` (default): the part is its own FSDP unit, sharded over the same ranks as the
  backbone (dp_shard x sp, replicated over dp_replicate). It is gathered once per step
  when its `lm_encode` runs (parts are called through `__call__`, see `call_part`).
- `replicate`: the part stays whole on every rank (no gather at all: worth it for a small
  encoder); its gradients are summed over the world after backward.

Under Ulysses SP every rank of an SP group holds the same payloads, so each runs the
encoders on all of them, then keeps only the rows its sequence shard's placeholders need
(`ph_index`): the full-length embedding sequence is never built. The cost is encoder
compute and activations repeated sp times; decoders' code embeddings likewise.
Decoders' heads run inside the root unit (they are called twice per step).
"""

from __future__ import annotations

import torch.nn as nn

from engine.comm import all_reduce

RECIPES = ("fsdp", "replicate")


def part_recipes(model: nn.Module) -> tuple[list[nn.Module], set[nn.Parameter]]:
    """(parts to shard as their own units, parameters to keep replicated)."""
    units, replicated = [], set()
    for name, part in getattr(model, "encoders", {}).items():
        recipe = model.specs[name].get("recipe", "fsdp")
        if recipe not in RECIPES:
            raise ValueError(f"part {name!r}: recipe {recipe!r} is unknown; use one of {', '.join(RECIPES)}")
        if recipe == "fsdp":
            units.append(part)
        else:
            replicated |= set(part.parameters())
    for name in getattr(model, "decoders", {}):
        if model.specs[name].get("recipe", "fsdp") != "fsdp":
            raise ValueError(f"part {name!r}: decoders support only recipe fsdp (they run in the root FSDP unit)")
    return units, replicated


def sync_replicated_grads(model: nn.Module) -> None:
    """Sum the gradients of replicated parameters over every rank (each saw other tokens)."""
    names = set(getattr(model, "replicated_param_names", ()))
    for name, p in model.named_parameters():
        if name in names and p.grad is not None:
            all_reduce(p.grad, axis="world")
