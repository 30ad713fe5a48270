"""`train.dtype: fp8` with `train.fp8_backend: te`: NVIDIA Transformer Engine's modules swapped in
from outside, the way Megatron-Core swaps module specs, and the forward run under TE's FP8
autocast.

What is swapped, in the backbone's blocks and the omni parts (on the meta-device model, before
activation checkpointing, compile and FSDP wrap them):
- `nn.Linear` -> `te.Linear` where both dimensions are multiples of 16 (TE's FP8 GEMM
  alignment), except the MoE router (its logits choose the experts);
- the backbone's `RMSNorm` -> `te.RMSNorm`.
Both keep the parameter names `weight` / `bias` and shapes, so the seeded initialisation, the
checkpoints and the Hugging Face export keep the plain layout. TE adds an `_extra_state` entry
per module (its FP8 scaling history) to the state dict; it is saved with a checkpoint and is
not part of the exported weights. Not swapped: `te.LayerNormLinear` (norm fused into the next
GEMM) would rename the norm's weight (`layer_norm_weight`) and needs the block's structure,
so the norm and the QKV / gate-up GEMMs stay separate modules; MoE experts (grouped GEMM, not
linears) stay in bf16.

Recipes (`train.fp8_recipe`): `tensorwise` -> `Float8CurrentScaling` (per-tensor scales from the
current tensor), `delayed` -> `DelayedScaling` (scales from an amax history of 16 steps, HYBRID:
E4M3 forward, E5M2 gradients). `rowwise` is torchao's only.

Not verified on this project's machines: TE needs CUDA to build and its wheels are too large to
bring to the offline GPU machine, so only the swap and the autocast wiring are tested here (on
CPU, against a stand-in module with TE's interface), never TE's numerics.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
import torch.nn as nn

from engine.config import Config, ConfigError
from engine.models.layers import RMSNorm

ALIGN = 16
KEEP = ("gate", "shared_expert_gate")
TE_RECIPES = ("tensorwise", "delayed")


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise ConfigError("config key 'train.fp8_backend' is te, but Transformer Engine does not import "
                          f"({e}); install transformer-engine[pytorch] on the CUDA machine (the [te] extra) or use "
                          "--train.fp8_backend=torchao") from None
    return te


def _swappable_linear(module: nn.Module, fqn: str) -> bool:
    return (type(module) is nn.Linear and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0
            and fqn.rsplit(".", 1)[-1] not in KEEP)


def _te_linear(te, old: nn.Linear) -> nn.Module:
    new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None, params_dtype=torch.float32,
                    device="meta")
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _te_rmsnorm(te, old: RMSNorm) -> nn.Module:
    new = te.RMSNorm(old.weight.shape[0], eps=old.eps, params_dtype=torch.float32, device="meta")
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def apply_transformer_engine(model: nn.Module) -> list[str]:
    """Swap the blocks' and parts' linears and the blocks' RMSNorms for TE's modules (in place, on
    the meta device); returns the swapped modules' names (relative to the model)."""
    te = _te()
    roots = {f"blocks.{name}": block for name, block in model.blocks.items()}
    roots.update({f"parts.{name}": part for name, part in model.parts().items()})
    swapped = []
    for prefix, root in roots.items():
        for fqn, module in list(root.named_modules()):
            if _swappable_linear(module, fqn):
                new = _te_linear(te, module)
            elif isinstance(module, RMSNorm) and prefix.startswith("blocks."):
                new = _te_rmsnorm(te, module)
            else:
                continue
            parent_name, _, child = fqn.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
            swapped.append(f"{prefix}.{fqn}")
    return swapped


def te_recipe(cfg: Config):
    if cfg.train.fp8_recipe not in TE_RECIPES:
        raise ConfigError(f"config key 'train.fp8_recipe' is {cfg.train.fp8_recipe}, which train.fp8_backend=te does not "
                          f"have; use one of {', '.join(TE_RECIPES)}")
    from transformer_engine.common import recipe

    if cfg.train.fp8_recipe == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)


def te_autocast(te, fp8_recipe) -> contextlib.AbstractContextManager:
    """TE's FP8 region: `te.autocast(recipe=...)` in TE 2.x, `te.fp8_autocast(fp8_recipe=...)` before."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)


def apply_fp8_autocast(model: nn.Module, cfg: Config) -> None:
    """Run `model.loss_sums` (the trainer's entry point) inside TE's FP8 autocast. Backward needs
    no region of its own: TE records what it needs in forward."""
    te, fp8_recipe = _te(), te_recipe(cfg)
    inner = model.loss_sums

    @functools.wraps(inner)
    def loss_sums(*args, **kwargs):
        with te_autocast(te, fp8_recipe):
            return inner(*args, **kwargs)

    model.loss_sums = loss_sums
