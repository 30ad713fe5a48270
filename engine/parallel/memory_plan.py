"""Dry-run plan of a layout: memory per rank and bytes moved per mesh axis, without weights.

The model is built on the meta device (shapes only) and every number is computed from the
config, the layout (ParallelDims) and the shapes, following what the engine does:

- **States** (per rank): fp32 master weights, fp32 gradients and AdamW's two fp32 moments
  (plus a 4-byte step per tensor), sharded as `plan.py` shards them: FSDP over dp_shard x sp
  (dim 0, padded to a multiple of the shard count), experts under EP as rows E/ep sharded
  over ep_fsdp = dp_shard x sp / ep, `replicate` parts whole. Frozen parameters have no
  gradient and no optimizer state.
- **FSDP buffers**: the root unit stays gathered for the step (FSDP2 does not reshard the root
  after forward), the last block too (`reshard_after_forward=False`), two other units are in
  flight (the one computing and the one prefetched) and one unit's unsharded gradients exist
  before its reduce-scatter. With gradient accumulation (data.micro_batch_size below the
  per-rank batch) FSDP2 keeps every unit's unsharded gradient in the reduce dtype (fp32)
  between micro-batches (`set_requires_gradient_sync(False)`): a whole unsharded copy.
- **Activations** of one micro-batch: the tensors autograd saves in each layer of this
  engine's code (engine/models, engine/modalities), with balanced routing for MoE layers and
  a stated worst case (every token of the EP group routed to this rank's experts); the
  encoders for a given number of payload tokens (default: one part's payload fills the whole
  micro-batch, the others run their dummy payloads); the loss (log-softmax output saved, two
  fp32 logits-sized gradients in backward). Activation checkpointing keeps each block's input
  and recomputes one block at a time in backward.
- **Communication** per optimizer step, in the bus-bytes convention of engine/comm
  (all_gather and reduce_scatter (n-1)/n of the full size, all_reduce 2(n-1)/n, all-to-all
  the bytes sent to other ranks).

Formulas count tensors, not allocator slack, kernel scratch or the CUDA context: leave a
margin (the CLI reports the peak against the device's memory as is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.config import Config, checkpointing_mode, resolve_layout
from engine.models import build_model
from engine.models.moe import is_moe_layer
from engine.models.part_specs import part_specs

from .dims import ParallelDims

GiB = 2 ** 30
F32 = 4


def _shard_numel(shape: tuple[int, ...], n: int) -> int:
    """Elements of one FSDP shard: dim 0 padded to a multiple of n."""
    if not shape:
        return 1
    return math.ceil(shape[0] / n) * math.prod(shape[1:])


@dataclass
class _Unit:
    """An FSDP unit: its parameters' full sizes (as this rank's module holds them) and the
    number of ranks it is sharded over."""

    name: str
    numel: int          # unsharded elements on this rank (experts: this EP rank's rows)
    trainable: int
    local: int          # this rank's shard
    local_trainable: int
    tensors: int        # trainable parameter tensors (AdamW keeps a step count for each)
    shards: int
    mesh: str           # axis the unit is gathered over: fsdp, ep_fsdp, replicate


def _units(model: nn.Module, cfg: Config, dims: ParallelDims) -> list[_Unit]:
    """Parameters grouped as plan.py groups them into FSDP units."""
    fsdp_n = dims.dp_shard * dims.sp if dims.world_size > 1 else 1
    ep = dims.ep if dims.world_size > 1 else 1
    owner: dict[int, tuple[str, str, int]] = {}  # id(param) -> (unit, mesh, shards)
    for name, block in model.blocks.items():
        for p in block.parameters():
            owner[id(p)] = (f"block {name}", "fsdp", fsdp_n)
    if ep > 1:
        for path, moe in model.moe_layers().items():
            for p in moe.experts.parameters():
                owner[id(p)] = (f"experts {path}", "ep_fsdp", fsdp_n // ep)
    for part_name, part in model.parts().items():
        replicate = _part_spec(cfg, part_name)[2].get("recipe", "fsdp") == "replicate"
        if _part_spec(cfg, part_name)[0] == "decoders":
            continue  # decoders run inside the root unit
        for p in part.parameters():
            owner[id(p)] = (f"part {part_name}", "replicate" if replicate else "fsdp", 1 if replicate else fsdp_n)
    units: dict[str, _Unit] = {}
    for p in model.parameters():
        unit, mesh, shards = owner.get(id(p), ("root", "fsdp", fsdp_n))
        shape = tuple(p.shape)
        if mesh == "ep_fsdp":
            shape = (shape[0] // ep, *shape[1:])
        numel = math.prod(shape)
        local = _shard_numel(shape, shards)
        u = units.setdefault(unit, _Unit(unit, 0, 0, 0, 0, 0, shards, mesh))
        u.numel += numel
        u.local += local
        if p.requires_grad:
            u.trainable += numel
            u.local_trainable += local
            u.tensors += 1
    return list(units.values())


# ---------------------------------------------------------------- activations, per layer

def compute_bytes(cfg: Config) -> int:
    """Bytes of an activation element on a CUDA run: bf16 under bf16 and fp8 (float8 matmuls
    keep their high-precision inputs for backward), fp32 otherwise."""
    return 2 if cfg.train.dtype in ("bf16", "fp8") else F32


def _norm(t: int, h: int, c: int) -> int:
    """RMSNorm (engine/models/layers.py) with its input: the input in fp32 (a bf16 input's
    fp32 copy; the bf16 input itself is saved by nothing else), the normalised tensor in the
    compute dtype (the weight's product), the output (the next matmul's input) and the [T, 1]
    reciprocal."""
    return t * h * (F32 + 2 * c) + t * F32


def attention_bytes(cfg: Config, t: int, c: int) -> dict[str, int]:
    """One attention sub-block for t local tokens (Ulysses: t = micro x seq / sp tokens of all
    heads before the all-to-all, the same bytes as all tokens of seq / sp heads after it)."""
    m, sp = cfg.model, cfg.parallel.sp_size
    d = m.head_dim or m.hidden_size // m.num_heads
    nq, nkv = m.num_heads, m.num_kv_heads
    kv = max(nkv, sp) if sp > 1 else nkv   # KV heads repeated to one per SP rank
    unit = t * d * c
    # QK-norm: the projection in fp32 and the normalised tensor (RoPE saves only cos / sin)
    qk_norm = (nq + nkv) * (t * d * (F32 + c) + t * F32) if m.qk_norm else 0
    return {
        "input + norm": _norm(t, m.hidden_size, c),
        # RoPE saves nothing of its own (cos / sin need no gradient); the kernel saves q, k, v
        # (the KV heads repeated to one per SP rank under Ulysses), its output and the log-sum-exp
        "q, k, v": unit * (nq + 2 * kv) + qk_norm,
        "attention output + log-sum-exp": unit * nq + t * nq * F32,
        # Ulysses: the output's all-to-all arrives head-major, so o_proj's input is a copy
        "o_proj input (Ulysses copy)": unit * nq if sp > 1 else 0,
    }


def masked_attention(cfg: Config) -> bool:
    """Whether attention on a CUDA run builds an S x S mask: `sdpa` / `eager` (also what `auto`
    takes in fp32) do; the flash varlen kernels (`auto` in bf16, flash_attn, varlen) and
    sdpa_doc do not."""
    backend = cfg.model.attention_backend
    if backend == "auto":  # engine/ops/attention.py resolve_backend on CUDA
        return cfg.train.dtype not in ("bf16", "fp8")
    return backend in ("sdpa", "eager")


def mask_bytes(cfg: Config, micro: int, c: int) -> int:
    """SDPA with a document mask: torch turns the [B, 1, S, S] bool mask into an additive mask
    of the compute dtype, one per layer (saved for backward)."""
    if not masked_attention(cfg):
        return 0
    s = cfg.data.seq_len + (-cfg.data.seq_len) % cfg.parallel.sp_size
    return micro * s * s * c


def mlp_bytes(cfg: Config, t: int, c: int) -> dict[str, int]:
    m = cfg.model
    return {"input + norm": _norm(t, m.hidden_size, c), "SwiGLU (gate, SiLU, up, product)": 4 * t * m.intermediate_size * c}


def moe_bytes(cfg: Config, t: int, c: int, worst: bool = False) -> dict[str, int]:
    """One MoE MLP. Balanced: each rank's experts receive the t*k rows its tokens send out.
    Worst case: every token of the EP group routed to this rank's experts (x ep rows)."""
    m, ep = cfg.model, cfg.parallel.ep_size
    k, e, h, i = m.num_experts_per_tok, m.num_experts, m.hidden_size, m.moe_intermediate_size
    rows = t * k * (ep if worst else 1)
    sp_copies = 2 if cfg.parallel.sp_size > 1 else 0  # padding kept out of the router's statistics
    terms = {
        "input + norm": _norm(t, h, c),
        "router (fp32 logits, probabilities, top-k)": t * e * F32 * (2 + sp_copies) + t * k * (8 + 2 * F32),
        "expert rows in, gate_up, SiLU, product": rows * (h + 4 * i) * c,
        "expert rows back (weighted sum)": t * k * h * c,
    }
    if m.shared_expert_intermediate_size:
        terms["shared expert"] = 4 * t * m.shared_expert_intermediate_size * c + t * h * c
    return terms


def _vit_bytes(n: int, dim: int, mlp: int, heads: int, c: int, fp32_rope: bool) -> int:
    """A pre-norm ViT / Whisper block over n rows: two LayerNorms (input and output), qkv, RoPE
    on q and k (vision), attention output, proj input, the MLP's fc1 output, activation
    intermediates and fc2 input."""
    ln = 2 * n * dim * c
    attn = n * dim * c * (3 + 1 + 1) + n * heads * F32
    rope = n * dim * (2 * F32 + 2 * c + 2 * F32) if fp32_rope else 0
    return 2 * ln + attn + rope + n * mlp * c * 3


def encoder_bytes(part: nn.Module, tokens: int, c: int, masked: bool = False) -> tuple[int, str]:
    """Saved activations of one encoder producing `tokens` placeholder embeddings; (0, why)
    for a part type the planner does not model. `masked`: the vision tower's attention is SDPA
    with a block mask over all patches (several images; not the varlen kernel)."""
    kind = part.registered_name
    if kind == "vision":
        ms = part.spatial_merge_size
        n = tokens * ms * ms  # patches
        blocks = part.depth * _layer_bytes(part, kind, n, c, masked)
        merger = 2 * n * part.embed_dim * c + 3 * tokens * part.merger.merged_dim * c
        return n * part.patch_dim * c + n * part.embed_dim * c + blocks + merger, f"{n} patches"
    if kind == "audio":
        s = tokens * part.pool_stride                    # positions after the stride-2 conv
        frames = 2 * s
        convs = frames * part.num_mel_bins * c + 2 * frames * part.d_model * c + 3 * s * part.d_model * c
        layers = len(part.layers) * _layer_bytes(part, kind, s, c, masked)
        return convs + layers + 2 * s * part.d_model * c, f"{s} frames after the conv"
    if kind == "image_vq":
        # the VQ tokenizer is frozen and runs without grad; the aligner MLP is trained
        p = part.embed_dim
        return tokens * (part.codebook_dim + 3 * p) * c, f"{tokens} codes"
    return 0, f"{kind}: not modelled"


def _part_tokens(model: nn.Module, payload_tokens: dict | None) -> dict[str, int]:
    """Placeholder tokens each part fills in one micro-batch: given, or each part's smallest
    (dummy) payload's, which parts without a payload run (the worst case is added by the caller)."""
    if payload_tokens is not None:
        return dict(payload_tokens)
    return {name: part.num_tokens(part.dummy_payload("cpu")) for name, part in model.parts().items()}


def loss_bytes(cfg: Config, rows: int, c: int) -> tuple[int, int, str]:
    """(bytes kept for backward, peak transient, path) of the LM head's loss over `rows` rows
    (engine/ops/fused_loss.py; the path a CUDA run takes). Plain: the fp32 log-softmax is kept;
    backward holds two fp32 logits-sized gradients (and their cast). Fused (chunked or Liger):
    the hidden states' gradient and the head weight's fp32 gradient are computed in forward and
    kept; a chunk's logits (about as large as the hidden states) exist at a time."""
    from engine.ops.fused_loss import chunk_rows, resolve

    h, v = cfg.model.hidden_size, cfg.model.vocab_size
    path = resolve(cfg.model.fused_loss, "cuda") if cfg.model.fused_loss != "liger" else "liger"
    if path == "plain":
        return rows * v * F32, 2 * rows * v * F32 + (rows * v * c if c != F32 else 0), "plain"
    chunk = chunk_rows(v, h, rows) if rows else 0
    forward = chunk * v * (F32 + (c if c != F32 else 0))  # a chunk's fp32 logits (the gradient, in place), its cast
    backward = rows * h * c + v * h * F32       # the kept gradients, scaled
    return rows * h * c + v * h * F32, max(forward, backward), f"fused, {path}"


def _selective_kept(cfg: Config, t: int, c: int, moe_layer: bool, worst: bool = False) -> int:
    """What `selective` keeps of one block: its input, the outputs of matmuls and of the
    attention kernel, and the buffers collectives received (engine/parallel/activation_memory.py)."""
    m, p = cfg.model, cfg.parallel
    d = m.head_dim or m.hidden_size // m.num_heads
    h, nq, nkv = m.hidden_size, m.num_heads, m.num_kv_heads
    kv = max(nkv, p.sp_size) if p.sp_size > 1 else nkv
    unit = t * d * c
    kept = t * h * c + unit * (nq + 2 * nkv) + unit * nq + t * nq * F32 + t * h * c  # in, qkv, attention, o_proj
    if p.sp_size > 1:
        kept += unit * (nq + 2 * kv) + unit * nq  # the all-to-alls' received buffers
    if not moe_layer:
        return kept + 2 * t * m.intermediate_size * c + t * h * c  # gate, up, down outputs
    k, e, i = m.num_experts_per_tok, m.num_experts, m.moe_intermediate_size
    rows = t * k * (p.ep_size if worst else 1)
    kept += t * e * c + rows * 2 * i * c + rows * h * c  # router logits, gate_up, down outputs
    if p.ep_size > 1:
        kept += rows * h * c + t * k * h * c  # rows received for this rank's experts, results received back
    if m.shared_expert_intermediate_size:
        kept += 2 * t * m.shared_expert_intermediate_size * c + 2 * t * h * c
    return kept


def _part_spec(cfg: Config, name: str) -> tuple[str, int, dict]:
    """(kind, index, spec) of part `name` in the config (not the model: levers change specs)."""
    return next((kind, i, spec) for kind, i, spec in part_specs(cfg.model) if spec.get("name") == name)


def _part_mode(cfg: Config, name: str) -> str:
    kind, i, spec = _part_spec(cfg, name)
    return checkpointing_mode(spec.get("activation_checkpointing", False), f"model.{kind}[{i}].activation_checkpointing")


def _encoder_kept(cfg: Config, name: str, part: nn.Module, tokens: int, c: int) -> tuple[int, int, str]:
    """(bytes kept until backward, bytes of one recomputed layer in backward, note) of an
    encoder under its own activation_checkpointing: full keeps each repeated layer's input,
    selective about its matmul outputs (half of what it saves)."""
    saved, note = encoder_bytes(part, tokens, c, masked_attention(cfg))
    mode = _part_mode(cfg, name)
    kind = part.registered_name
    if mode == "none" or not saved or kind not in ("vision", "audio"):
        return saved, 0, note
    # the repeated layers: vision blocks over patches, audio layers over post-conv frames
    layers, rows, width = ((part.depth, tokens * part.spatial_merge_size ** 2, part.embed_dim) if kind == "vision"
                           else (len(part.layers), tokens * part.pool_stride, part.d_model))
    one = _layer_bytes(part, kind, rows, c, masked_attention(cfg))
    outside = saved - layers * one
    if mode == "full":
        return outside + layers * rows * width * c, one, note + ", checkpointed (full)"
    return outside + layers * one // 2, one, note + ", checkpointed (selective)"


def _layer_bytes(part: nn.Module, kind: str, rows: int, c: int, masked: bool) -> int:
    """Saved bytes of one repeated layer of a vision / audio encoder over `rows` rows."""
    if kind == "vision":
        mask = rows * rows * c if masked else 0
        return _vit_bytes(rows, part.embed_dim, int(part.embed_dim * part.mlp_ratio), part.num_heads, c,
                          fp32_rope=True) + mask
    layer = part.layers[0]
    return _vit_bytes(rows, part.d_model, layer.fc1.out_features, layer.self_attn.n_heads, c, fp32_rope=False)


def activation_plan(model: nn.Module, cfg: Config, micro: int, payload_tokens: dict | None = None,
                    mode: str | None = None, offload: bool | None = None) -> dict:
    """Peak activation bytes of one micro-batch on one rank under checkpointing `mode` (none,
    full, selective; default: the config's) and activation offload (default: the config's)."""
    m, p = cfg.model, cfg.parallel
    if mode is None:
        mode = checkpointing_mode(p.activation_checkpointing, "parallel.activation_checkpointing")
    if offload is None:
        offload = p.activation_offload
    c = compute_bytes(cfg)
    seq = cfg.data.seq_len + (-cfg.data.seq_len) % p.sp_size
    t = micro * seq // p.sp_size
    h, v = m.hidden_size, m.vocab_size
    attn = attention_bytes(cfg, t, c)
    mask = mask_bytes(cfg, micro, c)
    dense, moe, moe_worst = mlp_bytes(cfg, t, c), moe_bytes(cfg, t, c), moe_bytes(cfg, t, c, worst=True)
    is_moe = [m.backbone == "moe" and is_moe_layer(m, i) for i in range(m.num_layers)]
    saved = [sum(attn.values()) + mask + sum((moe if x else dense).values()) for x in is_moe]
    saved_worst = [sum(attn.values()) + mask + sum((moe_worst if x else dense).values()) for x in is_moe]
    kept = {"none": saved, "full": [t * h * c] * len(saved),
            "selective": [_selective_kept(cfg, t, c, x) for x in is_moe]}[mode]
    kept_worst = {"none": saved_worst, "full": kept,
                  "selective": [_selective_kept(cfg, t, c, x, worst=True) for x in is_moe]}[mode]

    parts = model.parts()
    decoders = [name for name in parts if _part_spec(cfg, name)[0] == "decoders"]
    default = payload_tokens is None
    given = _part_tokens(model, payload_tokens)
    encoders: dict[str, dict] = {}
    for name, part in parts.items():
        if name in decoders:
            continue
        n, full = given.get(name, 0), micro * cfg.data.seq_len
        kept_n, layer_n, note = _encoder_kept(cfg, name, part, n, c)
        kept_f, layer_f, full_note = _encoder_kept(cfg, name, part, full, c)
        encoders[name] = {"tokens": n, "bytes": kept_n, "recompute": layer_n, "note": note, "full_tokens": full,
                          "full_bytes": kept_f, "full_recompute": layer_f, "full_note": full_note}
    dec_bytes = {name: encoder_bytes(parts[name], given.get(name, 0), c)[0] for name in decoders}
    enc_recompute = 0
    if default and encoders:  # worst case: the costliest part's payload fills the micro-batch
        worst = max(encoders, key=lambda n: encoders[n]["full_bytes"] - encoders[n]["bytes"])
        enc_total = sum(e["bytes"] for e in encoders.values()) - encoders[worst]["bytes"] + encoders[worst]["full_bytes"]
        enc_recompute = encoders[worst]["full_recompute"]
        enc_case = f"{worst}'s payload fills the micro-batch ({encoders[worst]['full_note']}), other parts dummy"
    else:
        enc_total = sum(e["bytes"] for e in encoders.values())
        enc_recompute = max((e["recompute"] for e in encoders.values()), default=0)
        enc_case = "the given payload tokens" if not default else "no encoders"
    # text rows reaching the LM head: every local token at worst; given payloads, the rest
    placeholders = sum(given.values()) // p.sp_size if not default else 0
    text = max(t - placeholders, 0)
    omni = bool(parts)
    rope = 2 * t * (m.head_dim or h // m.num_heads) * c * (3 if m.mrope_section else 1)
    loss_saved, loss_transient, loss_note = loss_bytes(cfg, text, c)
    head = {
        "final norm": _norm(t, h, c) + (text * h * c if omni and loss_note == "plain" else 0),
        f"LM loss ({loss_note}): kept for backward": loss_saved,
        "decoder inputs and heads": sum(dec_bytes.values()),
        "RoPE cos/sin": rope,
    }
    k, ie = m.num_experts_per_tok, m.moe_intermediate_size
    grads = [2 * t * h * c + (t * k * (3 * ie + 2 * h) * c if x else 2 * t * m.intermediate_size * c) for x in is_moe]
    mlp_grad = max(grads, default=0)
    # in backward a checkpointed block is recomputed whole, next to its gradients in flight
    recompute = max((s - kk + g - mlp_grad for s, kk, g in zip(saved, kept, grads)), default=0)
    rest = sum(head.values()) + enc_total
    if offload:
        # saved tensors outside checkpointed regions live in host memory between forward and
        # backward; the device holds what checkpointing keeps and one region in flight
        host = (sum(kept) if mode == "none" else 0) + rest
        kept_device = 0 if mode == "none" else sum(kept)
        in_flight = max(max(saved, default=0), loss_saved + loss_transient,
                        enc_recompute)
        peak = kept_device + in_flight + mlp_grad
        peak_worst = peak + (max(saved_worst, default=0) - max(saved, default=0))
    else:
        host = 0
        # the loss's backward comes first (everything kept); a block is recomputed later, when
        # the head's tensors are gone; the encoders' layers last, when the blocks' are gone too
        early = enc_total + rope
        worst_recompute = max((s - kk + g - mlp_grad for s, kk, g in zip(saved_worst, kept_worst, grads)), default=0)
        peak, peak_worst = (max(sum(kk) + rest + loss_transient, sum(kk) + early + rc + mlp_grad,
                                early + enc_recompute)
                            for kk, rc in ((kept, recompute), (kept_worst, worst_recompute)))
    return {
        "mode": mode, "offload": offload, "tokens_per_rank": t, "text_rows": text, "compute_bytes": c,
        "per_block": {"attention": attn, "attention mask (per layer)": mask,
                      "mlp": dense if not all(is_moe) else {}, "moe (balanced)": moe if any(is_moe) else {},
                      "moe (worst case)": moe_worst if any(is_moe) else {}},
        "blocks_saved": sum(saved), "blocks_kept": sum(kept), "encoders": encoders, "encoders_total": enc_total,
        "encoder_case": enc_case, "head": head, "loss_transient": loss_transient, "host_bytes": host,
        "peak": peak, "peak_moe_worst_case": peak_worst,
    }


# ---------------------------------------------------------------- communication

def comm_plan(model: nn.Module, cfg: Config, dims: ParallelDims, units: list[_Unit], micro: int,
              grad_accum: int) -> dict[str, dict[str, int]]:
    """Bytes one rank sends per optimizer step, {axis: {collective: bytes}}."""
    m, p = cfg.model, cfg.parallel
    c = compute_bytes(cfg)
    out: dict[str, dict[str, int]] = {}

    def add(axis: str, op: str, n: float) -> None:
        if n > 0:
            out.setdefault(axis, {})
            out[axis][op] = out[axis].get(op, 0) + int(n)

    # full checkpointing sends a block's collectives again in the recompute; selective replays them
    ckpt = checkpointing_mode(p.activation_checkpointing, "parallel.activation_checkpointing") == "full"
    if dims.world_size > 1:
        blocks = [u for u in units if u.name.startswith("block ")]
        last = blocks[-1].name if blocks else None
        for u in units:
            n = u.shards
            if u.mesh == "replicate":
                w = dims.world_size
                add("world (replicated parts)", "all_reduce", 2 * (w - 1) / w * u.trainable * F32)
                continue
            axis = "dp_shard x sp (FSDP)" if u.mesh == "fsdp" else "ep_fsdp (expert FSDP)"
            if n > 1:
                # gathered in forward; again in backward unless kept (root, last block)
                regather = 0 if u.name in ("root", last) else 1
                add(axis, "all_gather", grad_accum * (1 + regather) * (n - 1) * (u.local * c))
                add(axis, "reduce_scatter", (n - 1) * u.local_trainable * F32)
            if dims.dp_replicate > 1:
                r = dims.dp_replicate
                add("dp_replicate (HSDP)", "all_reduce", 2 * (r - 1) / r * u.local_trainable * F32)
    if dims.sp > 1:
        from .ulysses import ulysses_bytes_per_layer

        d = m.head_dim or m.hidden_size // m.num_heads
        seq = cfg.data.seq_len + (-cfg.data.seq_len) % dims.sp
        per_layer = ulysses_bytes_per_layer(micro, seq, m.num_heads, m.num_kv_heads, d, dims.sp, c)
        passes = 3 if ckpt else 2  # forward, backward (and the recomputed forward)
        add("sp (Ulysses)", "all_to_all", grad_accum * passes * m.num_layers * per_layer)
    moe_layers = [i for i in range(m.num_layers) if m.backbone == "moe" and is_moe_layer(m, i)]
    if dims.ep > 1 and moe_layers:
        seq = cfg.data.seq_len + (-cfg.data.seq_len) % dims.sp
        t = micro * seq // dims.sp
        rows = t * m.num_experts_per_tok * (dims.ep - 1) / dims.ep  # balanced: sent to the other ranks
        passes = 3 if ckpt else 2
        chunks = p.ep_chunks if p.ep_overlap else 1
        counts = (dims.ep - 1) / dims.ep * m.num_experts * chunks * 8  # int64 [ep, chunks, local experts]
        # forward: rows out and results back; backward: the same two exchanges reversed
        add("ep (experts)", "all_to_all", grad_accum * len(moe_layers) * (passes * 2 * rows * m.hidden_size * c
                                                                          + (passes - 1) * counts))
    if dims.world_size > 1 and moe_layers:
        w = dims.world_size
        stats = (2 * m.num_experts + 2) * F32
        passes = 3 if ckpt else 2
        add("world (router statistics)", "all_reduce", grad_accum * len(moe_layers) * passes * 2 * (w - 1) / w * stats)
    return out


# ---------------------------------------------------------------- the plan

def _states(units: list[_Unit]) -> dict[str, int]:
    local = sum(u.local for u in units)
    trainable = sum(u.local_trainable for u in units)
    tensors = sum(u.tensors for u in units)
    return {"params": F32 * local, "grads": F32 * trainable, "optimizer": 2 * F32 * trainable + F32 * tensors}


def _buffers(units: list[_Unit], cfg: Config, dims: ParallelDims, grad_accum: int) -> dict[str, int]:
    c = compute_bytes(cfg)
    if dims.world_size == 1:
        # autocast caches a bf16 copy of each weight it casts, for the whole forward
        trainable = sum(u.trainable for u in units)
        return {"autocast weight copies": c * trainable if c != F32 else 0}
    sharded = [u for u in units if u.shards > 1]
    blocks = [u for u in units if u.name.startswith("block ")]
    root = next((u for u in units if u.name == "root"), None)
    biggest = max((u.numel for u in sharded), default=0)
    moving = sum(sorted((u.numel for u in sharded if u is not root), reverse=True)[:2])  # the two largest
    out = {
        "root unit gathered": c * root.numel if root and root.shards > 1 else 0,
        "last block gathered": c * blocks[-1].numel if blocks and blocks[-1].shards > 1 else 0,
        "two units in flight": c * moving,
        "one unit's unsharded gradients": (c + (F32 if c != F32 else 0)) * biggest,
    }
    if grad_accum > 1:
        out["accumulated unsharded fp32 grads"] = F32 * sum(u.trainable for u in sharded)
    return out


def plan_layout(cfg: Config, world: int, device_memory_gb: float = 80.0, payload_tokens: dict | None = None,
                model: nn.Module | None = None) -> dict:
    """The whole plan as a JSON-ready dict (engine/parallel/plan_levers.py says what to change
    when it does not fit). Raises ConfigError for an impossible layout. `model`: the config's
    model already built on the meta device (shapes do not depend on the layout: reused)."""
    layout = resolve_layout(cfg, world)
    dims = ParallelDims.from_layout(layout, world)
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg.model)
    units = _units(model, cfg, dims)
    micro, accum = layout["micro_batch"], layout["grad_accum"]
    states = _states(units)
    buffers = _buffers(units, cfg, dims, accum)
    act = activation_plan(model, cfg, micro, payload_tokens)
    alternatives = {mode: activation_plan(model, cfg, micro, payload_tokens, mode=mode)["peak"]
                    for mode in ("none", "full", "selective")}
    peak = sum(states.values()) + sum(buffers.values()) + act["peak"]
    worst = peak - act["peak"] + act["peak_moe_worst_case"]
    budget = device_memory_gb * GiB
    out = {
        "world": world, "layout": layout, "device_memory_gb": device_memory_gb,
        "dtype": cfg.train.dtype, "activation_checkpointing": act["mode"], "activation_offload": act["offload"],
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "units": [{"name": u.name, "mesh": u.mesh, "shards": u.shards, "numel": u.numel, "local": u.local}
                  for u in units],
        "states": states, "fsdp_buffers": buffers, "activations": act, "activation_peak_by_mode": alternatives,
        "peak_bytes": peak, "peak_bytes_moe_worst_case": worst,
        "comm": comm_plan(model, cfg, dims, units, micro, accum),
        "fits": peak <= budget,
    }
    return out
