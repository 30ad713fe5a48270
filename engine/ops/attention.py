"""Attention kernels behind one signature, with document (packed-sequence) masking.

Every implementation takes q [B, Hq, S, D], k/v [B, Hkv, S, D] and an `AttentionMeta`
describing which document each token belongs to, and returns [B, Hq, S, D]. Tokens
attend causally and only within their own document. Model code receives one of these
as a plain callable; the parallel layer may wrap it (Ulysses) without the model knowing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.config import ConfigError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMeta"], torch.Tensor]


@dataclass
class AttentionMeta:
    """Per-forward attention metadata, shared by all layers (the mask is built once)."""

    doc_ids: Optional[torch.Tensor]
    """[B, S] document index per token, or None for one document per row."""
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)
    _varlen: Optional[tuple] = field(default=None, repr=False)

    def bool_mask(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """[B or 1, 1, S, S] boolean mask: True where attention is allowed."""
        if self._mask is None:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            if self.doc_ids is None:
                self._mask = causal[None, None]
            else:
                same_doc = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
                self._mask = (same_doc & causal)[:, None]
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 over the flattened batch, max document length)."""
        if self._varlen is None:
            self._varlen = cu_seqlens_from_doc_ids(self.doc_ids)
        return self._varlen


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (flash-attn's varlen format).

    ``doc_ids`` is ``[batch, seq]`` (or ``[seq]``); every row starts a new segment, and so
    does every change of doc id inside a row.
    """
    ids = doc_ids.reshape(1, -1) if doc_ids.dim() == 1 else doc_ids
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    begin = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]
    cu = torch.cat([begin, begin.new_tensor([ids.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _expand_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rep = n_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def sdpa_attention(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    k, v = _expand_kv(k, v, q.shape[1])
    if meta.doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.bool_mask(q.shape[2], q.device))


def sdpa_by_document(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """One causal SDPA call per document: no S x S mask is ever built, so memory grows with
    the documents' lengths, not the square of the packed sequence (the CPU counterpart of
    flash-attn's varlen kernel; what lets Ulysses SP reach long sequences)."""
    if meta.doc_ids is None:
        return sdpa_attention(q, k, v, meta)
    b, h, s, d = q.shape
    k, v = _expand_kv(k, v, h)
    cu, _ = meta.varlen()
    flat = [t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v)]
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1)[None] for t in flat), is_causal=True)[0]
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).reshape(h, b, s, d).transpose(0, 1)


LONG_ROWS = 2048  # from here the S x S mask of `sdpa_attention` dominates memory


def auto_cpu_attention(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """CPU default: one masked SDPA call for short rows (fewer kernel launches: about 3x
    faster at 256 tokens), one call per document for long rows (no S x S mask)."""
    if q.shape[2] >= LONG_ROWS:
        return sdpa_by_document(q, k, v, meta)
    return sdpa_attention(q, k, v, meta)


def eager_attention(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """Reference implementation (explicit softmax in fp32); slow, used to check the others."""
    k, v = _expand_kv(k, v, q.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~meta.bool_mask(q.shape[2], q.device), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def flash_attention(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """flash-attn's varlen kernel: packed documents without materialising an S x S mask."""
    from flash_attn import flash_attn_varlen_func  # GPU-only; imported lazily

    b, h, s, d = q.shape
    if meta.doc_ids is None:
        meta = AttentionMeta(doc_ids=torch.arange(b, device=q.device)[:, None].expand(b, s))
    cu, max_len = meta.varlen()
    flat = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], d)  # noqa: E731
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True)
    return out.reshape(b, s, h, d).transpose(1, 2)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def get_attention_fn(backend: str, device_type: str) -> AttentionFn:
    if backend == "auto":
        if device_type == "cuda":
            backend = "flash_attn" if flash_attn_available() else "sdpa"
        else:
            return auto_cpu_attention
    if backend == "flash_attn" and not flash_attn_available():
        raise ConfigError("config key 'model.attention_backend' is flash_attn, which needs the flash-attn package "
                          "and a CUDA device; install the [gpu] extra or use --model.attention_backend=sdpa (or auto)")
    return {"sdpa": sdpa_attention, "sdpa_doc": sdpa_by_document, "eager": eager_attention,
            "flash_attn": flash_attention}[backend]
