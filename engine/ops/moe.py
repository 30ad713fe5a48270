"""Mixture-of-experts kernels: token permutation, grouped GEMM, the local (no-EP) dispatcher.

Experts are stored fused, in Hugging Face's Qwen3-MoE layout:
`gate_up_proj` [E, 2*I, H] and `down_proj` [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[e] rows for expert e) times weight_t[e] [K, N].

    `torch._grouped_mm` (one kernel for all experts) where it accepts these inputs;
    otherwise a loop over experts with tokens (empty experts are skipped).
    """
    if x.shape[0] == 0:
        return x.new_zeros((0, weight_t.shape[-1]))
    if _use_grouped_kernel(x, weight_t):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight_t, offs=offs))
    # unbind, not weight_t[e]: indexing would make autograd build a full [E, K, N] zero
    # gradient for every expert. Under torch.compile, `tolist` is a graph break: the loop
    # runs eagerly between two compiled pieces (the fallback for fp32, which the compiled
    # kernel rejects).
    weights = weight_t.unbind(0)
    outs = [xe @ weights[e] for e, xe in enumerate(torch.split(x, counts.tolist())) if xe.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros((0, weight_t.shape[-1]))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: the CPU grouped-GEMM backward
    rejects the stride-0 gradients that broadcasting ops (e.g. a plain .sum()) produce."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GROUPED_OK: dict[tuple, bool] = {}


def _use_grouped_kernel(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these inputs.

    - Compiled (and on CUDA, eager too), the kernel takes BF16 only; on CUDA it also needs
      16-byte aligned rows (dimensions multiple of 8 in BF16; we ask 16, as the kernels'
      fast paths do) and a Hopper-class device, which the one-time probe finds out.
    - Eager on CPU, coverage differs between builds: probed once per (device, dtype).
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight_t.dtype:
        return False
    if (torch.compiler.is_compiling() or x.device.type == "cuda") and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda" and (x.shape[-1] % 16 or weight_t.shape[-1] % 16):
        return False
    key = (x.device.type, x.dtype)
    ok = _GROUPED_OK.get(key)
    if ok is None:
        ok = _GROUPED_OK[key] = _probe_grouped_mm(x.device, x.dtype)
    return ok


def grouped_gemm_warnings(hidden: int, expert_intermediate: int, dtype: str) -> list[str]:
    """Why a CUDA run's experts would take the per-expert loop (a host sync per layer to split
    the rows, one small GEMM per expert) instead of `torch._grouped_mm`; empty when the fast
    kernel applies (it also needs a Hopper-class GPU, probed at the first call)."""
    notes = []
    if dtype != "bf16":
        notes.append(f"train.dtype is {dtype}: torch._grouped_mm runs bf16 only on CUDA, so the experts loop over "
                     "experts; use --train.dtype=bf16 for the grouped GEMM")
    odd = {k: v for k, v in (("model.hidden_size", hidden), ("model.moe_intermediate_size", expert_intermediate))
           if v % 16}
    if odd:
        notes.append(f"{', '.join(f'{k}={v}' for k, v in odd.items())} not a multiple of 16: torch._grouped_mm needs "
                     "16-byte aligned rows, so the experts loop over experts")
    return notes


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """`_run_probe` outside any compiled graph. torch.compiler.disable is applied on the first
    call, not at import: decorating imports torch._dynamo (~1.8 s), which every process that
    only reads data (loader workers, tokenisers) would pay."""
    global _PROBE
    if _PROBE is None:
        _PROBE = torch.compiler.disable(_run_probe)
    return _PROBE(device, dtype)


_PROBE = None


def _run_probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the kernel forward and backward on a toy problem.

    The first MoE forward calls this, possibly inside an activation-checkpointed block:
    its own saved-tensor hooks keep the toy tensors out of the checkpoint's bookkeeping
    (the recomputation does not probe again, so it would save fewer tensors), and it runs
    with grad enabled whatever the caller's mode. Likewise the dispatch modes of selective
    checkpointing are set aside: they cache op outputs in call order, and the probe's own
    products, cached in forward but not issued again in the recomputation, would be handed
    to the block's real matmuls.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                _disable_current_modes():
            a = torch.ones(32, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
            y = torch._grouped_mm(a, b, offs=offs)
            y.backward(torch.ones_like(y))  # a dense gradient, as _ContiguousGrad guarantees
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on: it casts Linear layers' inputs and
    weights, but knows nothing of the grouped GEMM, which would otherwise run in fp32 (and,
    compiled, be rejected)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
               down_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over tokens already grouped by expert."""
    x, gate_up_proj, down_proj = _autocast_inputs(x, gate_up_proj, down_proj)
    gate, up = grouped_mm(x, gate_up_proj.transpose(1, 2), counts).chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), counts)


def permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """Copies of each token, one per chosen expert, sorted by expert.

    Returns (permuted rows [T*k, H], order: which (token, slot) each row is, counts [E]).
    """
    flat = topk_idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    k = topk_idx.shape[1]
    return x[order // k], order, counts


def unpermute(y: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order."""
    k = topk_weight.shape[1]
    weighted = y * topk_weight.flatten()[order, None].to(y.dtype)
    out = y.new_zeros((num_tokens, y.shape[-1]))
    return out.index_add(0, order // k, weighted)


def local_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts) -> torch.Tensor:
    """All experts on this process: permute, grouped GEMM, unpermute. `experts` offers
    `num_experts` and `ffn(rows grouped by expert, counts)`."""
    rows, order, counts = permute(x, topk_idx, experts.num_experts)
    y = experts.ffn(rows, counts)
    return unpermute(y, order, topk_weight, x.shape[0])
