"""Dense decoder-only transformer covering Llama, Qwen2 and Qwen3.

Readable top to bottom; no parallelism here. The training contract (engine/models/contract.py):
`loss_sums(batch)`, `target_counts(batch)`, `loss_weights`, `moe_layers()`. Hooks for the
parallel layer:
- `Attention.attention_fn` on every block (Ulysses wraps it),
- `blocks` is a ModuleDict so FSDP / activation checkpointing wrap each block by name,
- `init_param_(name, tensor, generator)` fills any parameter deterministically from its
  name, so a sharded model materialised shard by shard equals the one-process model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.batch import IGNORE_INDEX, Batch
from engine.config import ModelConfig
from engine.ops.attention import AttentionFn, AttentionMeta
from engine.ops.fused_loss import linear_cross_entropy

from .layers import Attention, RMSNorm, RotaryEmbedding, SwiGLU


class DenseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, head_dim,
                                   bias=cfg.attention_bias, qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, meta: AttentionMeta, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x), token_mask)


class DenseTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.mrope_section)
        self.blocks = nn.ModuleDict({str(i): DenseBlock(cfg, self.head_dim) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # ---- hooks -------------------------------------------------------------------------
    def attention_modules(self) -> list:
        return [block.self_attn for block in self.blocks.values()]

    def set_attention_fn(self, fn: AttentionFn) -> None:
        for attn in self.attention_modules():
            attn.attention_fn = fn

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the full-size `tensor` for parameter `name` (GPT-2 style scaled init)."""
        std = self.cfg.init_std
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.normal_(0.0, std / (2 * self.cfg.num_layers) ** 0.5, generator=generator)
        else:
            tensor.normal_(0.0, std, generator=generator)

    def reset_buffers(self) -> None:
        self.rotary.reset_buffers()

    def moe_layers(self) -> dict[str, nn.Module]:
        """MoE layers by module path (none in a dense model)."""
        return {}

    def parts(self) -> dict[str, nn.Module]:
        """Encoders and decoders by name (none in a bare backbone)."""
        return {}

    # ---- the training contract ---------------------------------------------------------
    @property
    def loss_weights(self) -> dict[str, float]:
        return {"lm": 1.0}

    def target_counts(self, batch: Batch) -> dict[str, int]:
        """Targets of each loss in this (local) batch, known before the forward pass."""
        counts = {"lm": int((batch.labels != IGNORE_INDEX).sum())}
        for g, name in enumerate(batch.loss_group_names):  # per data source: metrics, not weighted
            counts[f"lm/{name}"] = int((batch.loss_groups == g).sum())
        return counts

    def loss_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{"lm": summed cross-entropy over the batch's targets} (fp32). Calls `forward`
        directly: the parallel layer registers `loss_sums` itself as the FSDP entry point."""
        hidden = self.forward(batch.input_ids, batch.position_ids, batch.doc_ids, attn_meta=batch.attn_meta,
                              token_mask=batch.token_mask, return_hidden=True)
        groups = bool(batch.loss_group_names)
        loss, per_token = linear_cross_entropy(hidden.flatten(0, 1), self.head_weight(), batch.labels.flatten(),
                                               setting=self.cfg.fused_loss, per_token=groups)
        sums = {"lm": loss}
        if not groups:
            return sums
        groups = batch.loss_groups.flatten()
        for g, name in enumerate(batch.loss_group_names):
            sums[f"lm/{name}"] = per_token[groups == g].sum()
        return sums

    # ---- forward -----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attn_meta: Optional[AttentionMeta] = None, return_hidden: bool = False,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, S, V]. `doc_ids` [B, S] enables document masking for packed rows;
        `attn_meta` (given by the parallel layer) describes the full sequence when this
        forward only sees a shard of it. `token_mask` [B, S] (False = padding added by the
        parallel layer) keeps padding out of MoE router statistics. `return_hidden` gives the
        final-norm hidden states."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=h.device)[None].expand(b, s)
        cos, sin = self.rotary(position_ids, h.dtype)
        meta = attn_meta if attn_meta is not None else AttentionMeta(doc_ids=doc_ids)
        for block in self.blocks.values():
            h = block(h, cos, sin, meta, token_mask)
        h = self.norm(h)
        return h if return_hidden else self.logits(h)

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight())

    # ---- accounting --------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (PaLM appendix B)."""
        c = self.cfg
        dense = sum(p.numel() for n, p in self.named_parameters() if "embed_tokens" not in n)
        if c.tie_embeddings:
            dense += c.vocab_size * c.hidden_size
        return 6 * dense + 12 * c.num_layers * c.num_heads * self.head_dim * seq_len


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of cross-entropy over target tokens, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
