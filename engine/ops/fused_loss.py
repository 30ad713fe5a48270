"""Linear layer + cross-entropy without the [tokens, vocab] logits (`model.fused_loss`).

A language-model head's logits are the largest activation of a training step: 4,096 tokens
of a 151,936-word vocabulary are 2.5 GB in fp32, and the plain path holds three tensors of
that size at once (7.1 GB: docs/performance.md). Two fused paths avoid that:

- `chunked` (any device, PyTorch only): the rows are taken a chunk at a time (a chunk's
  logits about the size of the hidden states, at least 64 MiB); each chunk's logits give its loss and,
  in the same pass, its contribution to the gradients of the hidden states, the weight and
  the bias (softmax - one-hot, as Liger-Kernel does), so no chunk's logits outlive it and
  backward only scales the stored gradients by the incoming one. The weight's gradient is
  accumulated in fp32.
- `liger` (CUDA, `liger-kernel` installed): Liger-Kernel's Triton kernel, the same method.

Both return the sum of the loss over targets; `per_token=True` (per-source loss groups, which
are metrics) also gives each row's loss, without gradient, and takes the chunked path (Liger
returns no per-row losses). Only the sum carries a gradient: a caller never weights per-row
losses.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from engine.batch import IGNORE_INDEX

CHOICES = ("auto", "liger", "chunked", "off")
CHUNK_BYTES = 64 << 20  # the least fp32 logits a chunk holds (see chunk_rows)


@functools.lru_cache(maxsize=None)
def _liger_fn():
    """Liger-Kernel's functional fused linear cross-entropy, or None where it does not import."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001  (ImportError, or triton failing to load on this machine)
        return None
    return liger_fused_linear_cross_entropy


def liger_available() -> bool:
    return _liger_fn() is not None


def resolve(setting: str, device_type: str) -> str:
    """The path `model.fused_loss` takes on this device: plain, chunked or liger. Whether
    `liger` can run at all is checked at config time (engine/config.py)."""
    assert setting in CHOICES, setting
    if setting == "off":
        return "plain"
    if setting == "liger" or (setting == "auto" and device_type == "cuda" and liger_available()):
        return "liger"
    return "chunked"


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, setting: str = "auto",
                         per_token: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sum of cross-entropy over labels != IGNORE_INDEX in fp32, per-row losses [N] or None)
    of logits `hidden [N, H] @ weight[V, H].T + bias`, by the path `setting` resolves to."""
    path = resolve(setting, hidden.device.type)
    labels = labels.long()
    if path == "plain":
        logits = F.linear(hidden, weight, bias).float()
        if not per_token:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"), None
        per_row = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return per_row.sum(), per_row.detach()
    if path == "liger" and not per_token:
        out = _liger_fn()(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum")
        return (out[0] if isinstance(out, tuple) else out).float(), None
    # Function.forward sees needs_input_grad True under no_grad too: pass grad mode in.
    loss, rows = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels,
                                                  chunk_rows(*weight.shape, hidden.shape[0]), torch.is_grad_enabled())
    return loss, (rows if per_token else None)


def chunk_rows(vocab: int, hidden: int, rows: int) -> int:
    """Rows per chunk: a chunk's fp32 logits about the size of all the hidden states (Liger's
    rule), but at least CHUNK_BYTES: every chunk reads and writes the whole fp32 weight
    gradient, which made chunks of a few rows 4.5x slower than the plain path on CPU."""
    liger = -(-rows // max(1, -(-vocab // hidden)))
    return max(1, min(rows, max(liger, CHUNK_BYTES // (4 * vocab))))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss sum and per-row losses of `linear + cross-entropy`, with the gradients computed
    chunk by chunk in forward (the loss is a sum, so backward only scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, grad_mode):
        need_h, need_w, need_b = (grad_mode and need for need in ctx.needs_input_grad[:3])
        grads = need_h or need_w or need_b
        rows = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(h, weight, bias)  # under autocast: the same dtype as the plain path's
            mm_dtype = logits.dtype
            logits = logits.float()
            keep = y != IGNORE_INDEX
            safe = torch.where(keep, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[:, None])[:, 0]
            rows[start:start + chunk] = torch.where(keep, lse - target, 0.0)
            if not grads:
                continue
            # d(loss)/d(logits) = softmax - one-hot on target rows, 0 on ignored ones (in place).
            d = logits.sub_(lse[:, None]).exp_()
            d.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
            d.mul_(keep[:, None])
            d = d.to(mm_dtype)  # the matmuls run in the forward's precision (autocast casts the rest)
            if grad_h is not None:
                grad_h[start:start + chunk] = d @ weight
            if grad_w is not None and d.dtype == grad_w.dtype == h.dtype:
                grad_w.addmm_(d.t(), h)  # no weight-sized temporary
            elif grad_w is not None:
                grad_w += d.t() @ h
            if grad_b is not None:
                grad_b += d.float().sum(0)
        ctx.grads = [grad_h, grad_w, grad_b]  # not saved tensors: backward hands them over (no copy)
        ctx.mark_non_differentiable(rows)
        return rows.sum(), rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_rows):
        # Scaled in place and handed over (autograd then keeps them as .grad without a copy):
        # a second weight-sized gradient would double this path's peak. So this backward
        # runs once per forward (no retain_graph).
        assert ctx.grads is not None, "the fused loss's backward ran twice (retain_graph)"
        grads, ctx.grads = ctx.grads, None
        for g in grads:
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return (*grads, None, None, None)
