"""Building blocks of the Llama / Qwen2 / Qwen3 family, computation-only.

Conventions follow Hugging Face transformers (rotate-half RoPE, RMSNorm computed in
fp32, SwiGLU), so that weights map one to one and logits match.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.ops.attention import AttentionFn, AttentionMeta, sdpa_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies, with linear or Llama 3 ("llama3") context scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary cos/sin for positions [B, S]; with `mrope_section` (Qwen2-VL's multimodal
    RoPE) positions may be [3, B, S] (temporal, height, width): the frequency bands are
    split into those sections, section i taking its angles from axis i % 3. Text positions
    (equal on the 3 axes, or [B, S]) give exactly the plain rotary embedding."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None,
                 mrope_section: Optional[list[int]] = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.mrope_section = list(mrope_section) if mrope_section else None
        assert self.mrope_section is None or sum(self.mrope_section) == head_dim // 2, "mrope sections != head_dim/2"
        # Non-persistent: recomputed on materialisation, never checkpointed or sharded.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, D], or [3, B, S, D]
        if position_ids.dim() == 3:
            assert self.mrope_section is not None, "[3, B, S] positions need model.mrope_section"
            chunks = emb.split(self.mrope_section * 2, dim=-1)
            emb = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
        emb = emb[:, None]  # [B, 1, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """GQA self-attention with two hooks for the parallel layer:

    - `attention_fn(q, k, v, meta)`: the kernel (SDPA, flash-attn, ...);
    - `forward_impl(module, x, cos, sin, meta)`: replaces the whole forward when a recipe
      must interleave communication with the projections (async Ulysses). It builds on
      `project()` and `output()`, so the math stays defined here.
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.attention_fn: AttentionFn = sdpa_attention
        self.forward_impl: Optional[Callable] = None

    def project(self, x: torch.Tensor, which: str, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries, keys or values as [B, heads, S, D]; RoPE (and QK-norm) applied."""
        b, s, _ = x.shape
        proj, n, norm = {"q": (self.q_proj, self.n_heads, self.q_norm), "k": (self.k_proj, self.n_kv_heads, self.k_norm),
                         "v": (self.v_proj, self.n_kv_heads, None)}[which]
        t = proj(x).view(b, s, n, self.head_dim)
        if norm is not None:
            t = norm(t)
        t = t.transpose(1, 2)
        return t if which == "v" else apply_rope(t, cos, sin)

    def output(self, out: torch.Tensor, heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        """o_proj of [B, H, S, D]; with `heads` (global head ids of `out`'s H) the partial
        projection of just those heads, so that head groups can be projected as they arrive."""
        b, h, s, d = out.shape
        flat = out.transpose(1, 2).reshape(b, s, h * d)
        if heads is None:
            return self.o_proj(flat)
        cols = (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()
        return F.linear(flat, self.o_proj.weight[:, cols])

    def forward(self, x, cos, sin, meta: AttentionMeta) -> torch.Tensor:
        if self.forward_impl is not None:
            return self.forward_impl(self, x, cos, sin, meta)
        q, k, v = (self.project(x, w, cos, sin) for w in "qkv")
        return self.output(self.attention_fn(q, k, v, meta))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`token_mask` is accepted so that a block calls dense and MoE MLPs alike; a dense MLP
        treats every token the same, so it does not need it."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
