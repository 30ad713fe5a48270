"""Mixture-of-experts kernels: token permutation, grouped GEMM, the local (no-EP) dispatcher.

Experts are stored fused, in Hugging Face's Qwen3-MoE layout:
`gate_up_proj` [E, 2*I, H] and `down_proj` [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[e] rows for expert e) times weight_t[e] [K, N].

    `torch._grouped_mm` (one kernel for all experts) where this build supports it for the
    dtype and device; otherwise a loop over experts with tokens (empty experts are skipped).
    """
    if x.shape[0] == 0:
        return x.new_zeros((0, weight_t.shape[-1]))
    if hasattr(torch, "_grouped_mm") and _grouped_mm_ok(x):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight_t, offs=offs))
    # unbind, not weight_t[e]: indexing would make autograd build a full [E, K, N] zero
    # gradient for every expert
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


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """Probe once per (device type, dtype): the kernel's coverage differs between builds."""
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_OK:
        try:
            a = torch.ones(4, 8, device=x.device, dtype=x.dtype, requires_grad=True)
            b = torch.ones(2, 8, 8, device=x.device, dtype=x.dtype, requires_grad=True)
            y = torch._grouped_mm(a, b, offs=torch.tensor([1, 4], device=x.device, dtype=torch.int32))
            y.backward(torch.ones_like(y))  # a dense gradient, as _ContiguousGrad guarantees
            _GROUPED_OK[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor,
               down_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over tokens already grouped by expert."""
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
