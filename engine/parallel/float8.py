"""`train.dtype: fp8` with `train.fp8_backend: torchao`: float8 matmuls in the linear layers.

torchao's `convert_to_float8_training` swaps `nn.Linear` for `Float8Linear` in the blocks and
in the omni parts (forward, grad-input and grad-weight matmuls in float8 with dynamic scales:
recipe `tensorwise` or `rowwise`, `train.fp8_recipe`). Applied from the parallel layer on the
meta-device model, before activation checkpointing, compile and FSDP, so those wrap the
float8 layers. `Float8Linear` keeps the `weight` / `bias` parameters (fp32 master weights),
so checkpoints keep the plain layout: a run may resume in another precision, and the
Hugging Face export is unchanged.

Left in high precision:
- layers whose dimensions are not multiples of 16 (the float8 GEMMs' alignment),
- the MoE router (`gate`, `shared_expert_gate`): its logits choose the experts,
- the LM heads (outside the blocks; the fused loss keeps their logits small anyway),
- the MoE experts: they are grouped parameters run by `torch._grouped_mm`, not linears;
  torchao's float8 grouped GEMM is a CUDA-only prototype (`torchao.prototype.moe_training`),
  not used here, so experts stay in the high-precision dtype,
- frozen parts (no gradient: nothing to train in float8).

On CPU float8 is for numerics only: torch 2.13's CPU `torch._scaled_mm` is a reference kernel
(about 0.4 s for a 512 x 64 x 176 product, ~14 MFLOP/s, so 30 steps of tiny_dense took 7
minutes), so there torchao's `emulate` mode runs the matmuls: the same float8 casts and scales
of inputs, weights and gradients, the products of the float8 values in fp32. The
high-precision dtype: bf16 on CUDA (as train.dtype=bf16), fp32 on CPU, which keeps one
process and FSDP comparable. FSDP all-gathers the high-precision weights (gloo cannot
all-gather float8); on CUDA with the tensorwise recipe the all-gather is in float8 (NCCL).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from engine.config import Config

ALIGN = 16
KEEP = ("gate", "shared_expert_gate")


def high_precision(dtype: str, device_type: str) -> str:
    """The dtype (fp32 / bf16) of everything train.dtype leaves out of float8."""
    if dtype != "fp8":
        return dtype
    return "bf16" if device_type == "cuda" else "fp32"


def _convertible(module: nn.Module, fqn: str) -> bool:
    return (type(module) is nn.Linear and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0
            and module.weight.requires_grad and fqn.rsplit(".", 1)[-1] not in KEEP)


def apply_float8(model: nn.Module, cfg: Config, device_type: str, fsdp: bool) -> list[str]:
    """Swap the convertible linears of the blocks and parts for torchao's Float8Linear;
    returns their names (relative to the model)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(cfg.train.fp8_recipe)
    if fsdp and device_type == "cuda" and cfg.train.fp8_recipe == "tensorwise":
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    if device_type != "cuda":  # see the module doc: float8 casts as on CUDA, products in fp32
        config = dataclasses.replace(config, emulate=True)
    roots = {f"blocks.{name}": block for name, block in model.blocks.items()}
    roots.update({f"parts.{name}": part for name, part in model.parts().items()})
    converted = []
    for prefix, root in roots.items():
        names = [f"{prefix}.{fqn}" for fqn, m in root.named_modules() if _convertible(m, fqn)]
        if names:
            convert_to_float8_training(root, config=config, module_filter_fn=_convertible)
            converted += names
    return converted
