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

from engine.batch import NEW_DOCUMENT, Batch
from engine.comm import all_to_all, start_all_to_all
from engine.ops.attention import AttentionMeta

HEADS, SEQ = 1, 2  # dims of [B, H, S, D]


def shard_batch(batch: Batch, sp_rank: int, sp_size: int) -> Batch:
    """Pad the packed rows to a multiple of sp_size and keep this rank's contiguous shard.

    Every per-position field the Batch declares is padded with its declared value and
    sliced along its last (sequence) dimension, whatever its leading dimensions ([B, S]
    ids, [3, B, S] multimodal positions). Padding forms its own document (no real token
    attends to it) and carries the ignore label (no loss). RoPE positions stay those of the
    full sequence. Payloads pass through whole. Sets `attn_meta` (the full sequence's
    documents), `true_seq_len` and `token_mask` (False on padding).
    """
    rows, seq = batch.input_ids.shape
    pad = (-seq) % sp_size
    local = (seq + pad) // sp_size
    cut = slice(sp_rank * local, (sp_rank + 1) * local)
    real = torch.arange(seq + pad, device=batch.input_ids.device) < seq
    padded = {"token_mask": real.expand(rows, -1) if batch.token_mask is None else batch.token_mask}
    for f in Batch.sequence_fields():
        value = padded.get(f.name, getattr(batch, f.name))
        if value is None:
            continue
        assert value.shape[-1] in (seq, seq + pad), f"{f.name}: last dim {value.shape[-1]} is not the sequence"
        if pad and value.shape[-1] == seq:
            if f.metadata["pad"] is NEW_DOCUMENT:
                fill = (value.amax(dim=-1, keepdim=True) + 1).expand(*value.shape[:-1], pad)
            else:
                fill = value.new_full((*value.shape[:-1], pad), f.metadata["pad"])
            value = torch.cat([value, fill], dim=-1)
        padded[f.name] = value
    sliced = {name: value[..., cut] for name, value in padded.items()}
    return batch.replace(**sliced, attn_meta=AttentionMeta(doc_ids=padded["doc_ids"]), true_seq_len=seq)


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
