"""Mixture-of-experts layer (Qwen3-MoE compatible, optional Qwen2-MoE shared expert).

Computation-only. Two hooks for the parallel layer:
- `MoE.dispatcher(x, topk_idx, topk_weight, experts) -> y`: where experts run (local
  grouped GEMM by default; all-to-all expert parallelism when a recipe sets it);
- `MoE.reduce_router_stats(t) -> t`: sums router statistics over the ranks that share one
  global batch (identity on one process), so the load-balancing loss is the loss of the
  global batch whatever the layout. `aux_share` is this rank's share of that loss (1/ranks),
  so that summing gradients over ranks counts it once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig
from engine.ops.moe import expert_ffn, local_dispatch

from .dense import DenseTransformer
from .layers import SwiGLU


class Experts(nn.Module):
    """Expert weights fused as 3-D tensors ([experts, ...]); `num_experts` is the local count.

    The whole dispatch runs inside this module's forward, so that a wrapper on the module
    (FSDP gathering the expert shards) sees exactly one call per layer, however many
    chunks the dispatcher cuts the tokens into.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        # Hook for expert parallelism: {param name: (global shape, first row)} when this rank
        # holds only a block of rows of the global [experts, ...] tensors (empty otherwise).
        self.global_rows: dict[str, tuple[tuple[int, ...], int]] = {}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def ffn(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of rows grouped by local expert (counts[e] rows for expert e)."""
        return expert_ffn(rows, counts, self.gate_up_proj, self.down_proj)

    def forward(self, x, topk_idx, topk_weight, dispatcher: Callable) -> torch.Tensor:
        return dispatcher(x, topk_idx, topk_weight, self)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.aux_coef, self.z_coef = cfg.router_aux_loss_coef, cfg.router_z_loss_coef
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.dispatcher: Callable = local_dispatch
        self.reduce_router_stats: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        self.aux_share = 1.0
        self.aux_loss: Optional[torch.Tensor] = None
        self.collect_aux = True  # armed by the model's forward, disarmed once recorded
        self.tokens_per_expert: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(router logits, probabilities, top-k expert ids, top-k weights), in fp32."""
        logits = self.gate(x).float()
        probs = logits.softmax(dim=-1)
        topk_weight, topk_idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return logits, probs, topk_idx, topk_weight

    def router_losses(self, logits, probs, topk_idx, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Switch-style load balancing E * sum_e f_e * P_e, plus the optional router z-loss,
        both over the global batch (statistics summed by `reduce_router_stats`) and over the
        tokens in `keep` only (padding never counts, so the loss does not depend on how much
        padding a layout adds)."""
        if keep is not None:
            logits, probs, topk_idx = logits[keep], probs[keep], topk_idx[keep]
        counts = torch.bincount(topk_idx.flatten(), minlength=self.num_experts).float()
        stats = torch.cat([counts.detach(), probs.sum(0), (torch.logsumexp(logits, -1) ** 2).sum()[None],
                           logits.new_tensor([float(logits.shape[0])])])
        stats = self.reduce_router_stats(stats)
        e = self.num_experts
        counts, prob_sum, z_sum, n_tokens = stats[:e], stats[e:2 * e], stats[2 * e], stats[2 * e + 1].detach()
        self.tokens_per_expert = counts.detach()
        f = counts / (n_tokens * self.top_k)
        aux = self.aux_coef * e * (f * prob_sum / n_tokens).sum()
        if self.z_coef:
            aux = aux + self.z_coef * z_sum / n_tokens
        return aux * self.aux_share

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`token_mask` [B, S]: False for padding, which is still computed (its output is
        never read) but left out of the router statistics."""
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        logits, probs, topk_idx, topk_weight = self.route(flat)
        keep = None if token_mask is None else token_mask.reshape(-1)
        aux = self.router_losses(logits, probs, topk_idx, keep) if self.training else None
        # Recorded once per model forward: activation checkpointing runs this forward again in
        # backward, and a recorded recomputed loss would keep that recomputation's graph (the
        # block's attention, norm and router tensors) alive until the next step.
        if self.collect_aux:
            self.aux_loss, self.collect_aux = aux, False
        y = self.experts(flat, topk_idx, topk_weight.to(flat.dtype), self.dispatcher)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.reshape(b, s, h)


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """Hugging Face's rule: every `decoder_sparse_step`-th layer, except `mlp_only_layers`."""
    return cfg.num_experts > 0 and i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0


class MoETransformer(DenseTransformer):
    """The dense decoder with MoE MLPs where `is_moe_layer`; dense and MoE layers can mix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        for i, block in self.blocks.items():
            if is_moe_layer(cfg, int(i)):
                block.mlp = MoE(cfg)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        for moe in self.moe_layers().values():
            moe.collect_aux = True
        return super().forward(*args, **kwargs)

    def moe_layers(self) -> dict[str, MoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if name.endswith("experts.down_proj"):
            tensor.normal_(0.0, self.cfg.init_std / (2 * self.cfg.num_layers) ** 0.5, generator=generator)
        elif name.endswith("experts.gate_up_proj"):
            tensor.normal_(0.0, self.cfg.init_std, generator=generator)
        else:
            super().init_param_(name, tensor, generator)

    def flops_per_token(self, seq_len: int) -> float:
        """Active parameters only: each token runs top-k of the experts."""
        c = self.cfg
        total = super().flops_per_token(seq_len)
        expert_params = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()
                            for m in self.moe_layers().values())
        return total - 6 * expert_params * (1 - c.num_experts_per_tok / c.num_experts)

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def loss_sums(self, batch) -> dict[str, torch.Tensor]:
        """The dense model's losses plus `aux_loss`: this rank's share of the load-balancing
        (and z-) loss of the forward just run, a term without target count (see contract)."""
        sums = super().loss_sums(batch)
        if self.training:
            sums["aux_loss"] = self.aux_loss()
        return sums

