"""Attention kernels behind one signature, with document (packed-sequence) masking.

Every implementation takes q [B, Hq, S, D], k/v [B, Hkv, S, D] and an `AttentionMeta`
describing which document each token belongs to, and returns [B, Hq, S, D]. Tokens
attend causally and only within their own document. Model code receives one of these
as a plain callable; the parallel layer may wrap it (Ulysses) without the model knowing.
"""

from __future__ import annotations

import inspect
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
    # enable_gqa lets the kernel share KV heads instead of materialising repeated copies
    gqa = k.shape[1] != q.shape[1]
    if meta.doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.bool_mask(q.shape[2], q.device), enable_gqa=gqa)


def sdpa_by_document(q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """One causal SDPA call per document: no S x S mask is ever built, so memory grows with
    the documents' lengths, not the square of the packed sequence (the CPU counterpart of
    flash-attn's varlen kernel; what lets Ulysses SP reach long sequences)."""
    if meta.doc_ids is None:
        return sdpa_attention(q, k, v, meta)
    b, h, s, d = q.shape
    gqa = k.shape[1] != h
    cu, _ = meta.varlen()
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v)]
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1)[None] for t in flat), is_causal=True,
                                           enable_gqa=gqa)[0]
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


def _packed_flash(kernel, dtype: torch.dtype) -> AttentionFn:
    """An AttentionFn over a varlen flash `kernel(q, k, v [T, H, D], cu_seqlens, max_len)`:
    the packed rows flattened into documents (no S x S mask, no padding), computed in `dtype`,
    answered in v's dtype."""

    def attention(q, k, v, meta: AttentionMeta) -> torch.Tensor:
        b, h, s, d = q.shape
        out_dtype = v.dtype
        q, k, v = _half(q, k, v, dtype)
        cu, max_len = _rows_as_documents(meta, b, s, q.device).varlen()
        flat = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], d)  # noqa: E731
        out = kernel(flat(q), flat(k), flat(v), cu, max_len)
        return out.reshape(b, s, h, d).transpose(1, 2).to(out_dtype)

    return attention


def _flash_attn_kernel(q, k, v, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func  # GPU-only; imported lazily

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def make_flash_attention(dtype: torch.dtype) -> AttentionFn:
    """flash-attn's varlen kernel (the flash-attn package)."""
    return _packed_flash(_flash_attn_kernel, dtype)


def _half(q, k, v, dtype: torch.dtype):
    """Flash kernels take fp16/bf16 only; under autocast q and k leave RoPE in fp32 while v is
    bf16, so all three are cast to the run's compute dtype (bf16 runs only: see get_attention_fn)."""
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in (q, k, v))


def _rows_as_documents(meta: AttentionMeta, b: int, s: int, device) -> AttentionMeta:
    return meta if meta.doc_ids is not None else AttentionMeta(
        doc_ids=torch.arange(b, device=device)[:, None].expand(b, s))


def varlen_call(q, k, v, cu: torch.Tensor, max_len: int, causal: bool) -> torch.Tensor:
    """PyTorch's own flash varlen kernel (`torch.nn.attention.varlen`, CUDA) on [T, H, D]
    tensors. Its keywords changed between releases (torch 2.11 on the GPU machine, 2.13
    here): causality is `window_size=(-1, 0)` where that exists, else `is_causal`; KV heads
    are shared with `enable_gqa` where that exists, else repeated."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def make_varlen_attention(dtype: torch.dtype) -> AttentionFn:
    """torch's own varlen flash kernel (`torch.nn.attention.varlen`)."""
    return _packed_flash(lambda q, k, v, cu, max_len: varlen_call(q, k, v, cu, max_len, causal=True), dtype)


def make_vision_varlen_attention(dtype: torch.dtype):
    """The vision towers' kernel hook (`VisionAttention.attention_fn`: q, k, v [1, H, S, D] and
    segments with `cu_seqlens` / `max_seqlen`) through torch's varlen flash kernel:
    bidirectional attention within each image slice or window, no S x S block mask."""

    def vision_varlen_attention(q, k, v, segments) -> torch.Tensor:
        out_dtype = v.dtype
        q, k, v = _half(q, k, v, dtype)
        flat = lambda t: t[0].transpose(0, 1)  # noqa: E731  [S, H, D]
        out = varlen_call(flat(q), flat(k), flat(v), segments.cu_seqlens.to(torch.int32), int(segments.max_seqlen),
                          causal=False)
        return out.transpose(0, 1)[None].to(out_dtype)

    return vision_varlen_attention


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


HALF_PRECISION = {"bf16": torch.bfloat16}


def resolve_backend(backend: str, device_type: str, dtype: str = "fp32") -> str:
    """The kernel `auto` means here. On CUDA a bf16 run takes a flash varlen kernel (the
    flash-attn package if installed, else torch's own); an fp32 run takes SDPA, because flash
    kernels compute in half precision only. On CPU: masked SDPA for short rows, one call per
    document for long ones."""
    if backend != "auto":
        return backend
    if device_type != "cuda":
        return "auto_cpu"
    if dtype not in HALF_PRECISION:
        return "sdpa"
    if flash_attn_available():
        return "flash_attn"
    return "varlen" if varlen_available() else "sdpa"


def get_attention_fn(backend: str, device_type: str, dtype: str = "fp32") -> AttentionFn:
    """The attention kernel of `model.attention_backend` on this device for `train.dtype`
    (a ConfigError when that kernel cannot run here)."""
    backend = resolve_backend(backend, device_type, dtype)
    key = f"config key 'model.attention_backend' is {backend}"
    if backend in ("flash_attn", "varlen"):
        available = flash_attn_available() if backend == "flash_attn" else varlen_available()
        if device_type != "cuda" or not available:
            need = "the flash-attn package and a CUDA device (the [flash] extra)" if backend == "flash_attn" \
                else "a CUDA device and torch.nn.attention.varlen (torch >= 2.9)"
            raise ConfigError(f"{key}, which needs {need}; use --model.attention_backend=auto (or sdpa)")
        if dtype not in HALF_PRECISION:
            raise ConfigError(f"{key}, whose flash kernels compute in bf16 only, but train.dtype is {dtype}; "
                              f"use --train.dtype=bf16 or --model.attention_backend=sdpa")
        make = make_flash_attention if backend == "flash_attn" else make_varlen_attention
        return make(HALF_PRECISION[dtype])
    return {"sdpa": sdpa_attention, "sdpa_doc": sdpa_by_document, "eager": eager_attention,
            "auto_cpu": auto_cpu_attention}[backend]
