"""Ulysses sequence parallelism (DeepSpeed-Ulysses), synchronous and asynchronous.

Each rank of the SP group holds a contiguous shard of the (padded) packed sequence.
Around attention, an all-to-all turns "my tokens, all heads" into "all tokens, my heads";
attention runs over the full sequence with document masking; a second all-to-all turns
the result back. Nothing in the model changes: `shard_batch` slices the inputs, and the
attention hooks are set on each `Attention` module.

GQA: with num_kv_heads >= sp, KV heads are scattered like query heads; with fewer KV
heads than ranks, each KV head is repeated so that every rank receives the KV head its
query heads use (sp must then be a multiple of num_kv_heads).

Async (`parallel.sp_async`): the all-to-all of Q is launched as soon as Q is projected and
runs while K and V are projected; in backward the gradient exchanges of V, K and Q are
launched together and each is waited on only when its projection's backward needs it.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from engine.comm import all_to_all, start_all_to_all
from engine.ops.attention import AttentionMeta

HEADS, SEQ = 1, 2  # dims of [B, H, S, D]


# Padding values of the per-position [B, S] tensors a batch may carry.
FILL = {"input_ids": 0, "labels": -100, "position_ids": 0, "ph_index": -1, "dec_next_index": -1, "dec_next_part": -1}


def shard_batch(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """Pad the packed rows to a multiple of sp_size and keep this rank's contiguous shard.

    Padding tokens form their own document (so no real token attends to them) and have
    label -100 (so they add nothing to the loss). RoPE positions stay those of the full
    sequence. Every other [B, S] tensor (placeholder layout of omni batches) is sliced the
    same way; payloads pass through whole. Adds `attn_meta` describing the full sequence.
    """
    doc = batch["doc_ids"]
    rows, seq = doc.shape
    pad = (-seq) % sp_size
    local = (seq + pad) // sp_size
    cut = slice(sp_rank * local, (sp_rank + 1) * local)
    if pad:
        doc = torch.cat([doc, (doc.max(dim=1, keepdim=True).values + 1).expand(-1, pad)], dim=1)
    out = dict(batch)
    for key, value in batch.items():
        if key == "doc_ids" or not (isinstance(value, torch.Tensor) and value.shape == (rows, seq)):
            continue
        assert key in FILL, f"no padding value for per-position tensor {key!r}"
        if pad:
            value = torch.cat([value, value.new_full((rows, pad), FILL[key])], dim=1)
        out[key] = value[:, cut]
    real = torch.arange(seq + pad, device=doc.device) < seq
    out.update(doc_ids=doc[:, cut], attn_meta=AttentionMeta(doc_ids=doc), true_seq_len=seq,
               token_mask=real[cut].expand(rows, -1))
    return out


def check_heads(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Internal invariant; the config layer reports the user-facing error."""
    assert num_heads % sp == 0 and (num_kv_heads % sp == 0 or sp % num_kv_heads == 0)


def _expand_kv(t: torch.Tensor, sp: int) -> torch.Tensor:
    """Repeat KV heads so that there is one per SP rank (when num_kv_heads < sp)."""
    n_kv = t.shape[HEADS]
    return t if n_kv >= sp else t.repeat_interleave(sp // n_kv, dim=HEADS)


class UlyssesAttention:
    """The `forward_impl` hook of one Attention module under SP."""

    def __init__(self, sp_mesh: DeviceMesh, async_op: bool):
        self.group = sp_mesh.get_group()
        self.sp = sp_mesh.size()
        self.async_op = async_op

    def __call__(self, attn, x, cos, sin, meta: AttentionMeta) -> torch.Tensor:
        check_heads(attn.n_heads, attn.n_kv_heads, self.sp)
        to_heads = dict(scatter_dim=HEADS, gather_dim=SEQ, group=self.group, axis="sp")
        if self.async_op:
            pending = []
            for which in "qkv":  # launch each exchange, then project the next while it flies
                t = attn.project(x, which, cos, sin)
                pending.append(start_all_to_all(t if which == "q" else _expand_kv(t, self.sp), **to_heads))
            q, k, v = (p.wait() for p in pending)
        else:
            q = all_to_all(attn.project(x, "q", cos, sin), **to_heads)
            k = all_to_all(_expand_kv(attn.project(x, "k", cos, sin), self.sp), **to_heads)
            v = all_to_all(_expand_kv(attn.project(x, "v", cos, sin), self.sp), **to_heads)
        out = attn.attention_fn(q, k, v, meta)  # full sequence, this rank's heads
        to_seq = dict(scatter_dim=SEQ, gather_dim=HEADS, group=self.group, axis="sp")
        local_heads = out.shape[HEADS]
        if not self.async_op or local_heads < 2:
            return attn.output(all_to_all(out, **to_seq))
        # Two head groups: project the first while the second is still in flight.
        half = local_heads // 2
        groups = [(0, half), (half, local_heads)]
        pending = [start_all_to_all(out[:, lo:hi], **to_seq) for lo, hi in groups]
        result = None
        for (lo, hi), p in zip(groups, pending):
            heads = (torch.arange(self.sp, device=out.device)[:, None] * local_heads
                     + torch.arange(lo, hi, device=out.device)).flatten()  # rank-major, as gathered
            part = attn.output(p.wait(), heads)
            result = part if result is None else result + part
        return result


def apply_ulysses(attention_modules: list, sp_mesh: DeviceMesh, async_op: bool) -> None:
    hook = UlyssesAttention(sp_mesh, async_op)
    for attn in attention_modules:
        attn.forward_impl = hook


def ulysses_bytes_per_layer(batch: int, seq: int, n_heads: int, n_kv_heads: int, head_dim: int, sp: int,
                            elem_bytes: int) -> int:
    """Analytic bytes one rank sends per attention layer in forward (backward is the same):
    four all-to-alls (Q, K, V in; output back), each sending (sp-1)/sp of the local tensor."""
    kv = max(n_kv_heads, sp)
    local_tokens = batch * seq // sp
    elems = local_tokens * head_dim * (n_heads + 2 * kv + n_heads)
    return elems * elem_bytes * (sp - 1) // sp
