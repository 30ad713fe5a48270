"""Measure what tools/plan.py predicts, on a real (small) run: one rank's bytes of parameters,
gradients and AdamW states (local shards); the peak activation bytes of one micro-batch's
forward and backward (torch's MemTracker: categories Activation + Temp at the peak); the bytes
autograd keeps for backward at the end of a forward (saved-tensor hooks, and the fused loss's
gradients kept on its ctx); the bytes engine.comm counted per (collective, axis) in the
forward/backward; the placeholder tokens of each omni part in the micro-batch. Writes OUT.json on rank 0.

    python plan_worker.py OUT.json --config ... --section.key=value ...   (plain or under torchrun)

Balanced routing (PLAN_BALANCED_ROUTING=1): token i picks experts (i*k + j) mod E, so every
rank sends and receives exactly the planner's balanced share in the EP all-to-alls.
"""

import gc
import json
import os
import sys

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from engine.comm import STATS, init_distributed, shutdown
from engine.config import load_config, parse_overrides
from engine.models.moe import MoE
from engine.training.trainer import Trainer


def balanced_route(self, x):
    logits = self.gate(x).float()
    probs = logits.softmax(dim=-1)
    n, k = x.shape[0], self.top_k
    idx = (torch.arange(n, device=x.device)[:, None] * k + torch.arange(k, device=x.device)) % self.num_experts
    weight = probs.gather(1, idx)
    if self.norm_topk_prob:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return logits, probs, idx, weight


class _NoHook:
    def remove(self):
        pass


def tolerate_frozen_params():
    """MemTracker registers a gradient hook on every parameter; frozen ones (the VQ tokenizer)
    refuse hooks. They never get a gradient, so a no-op handle is the same thing."""
    for name in ("register_hook", "register_post_accumulate_grad_hook"):
        register = getattr(torch.Tensor, name)

        def guarded(self, hook, register=register):
            return register(self, hook) if self.requires_grad else _NoHook()

        setattr(torch.Tensor, name, guarded)


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(t):
    t = local(t)
    return t.numel() * t.element_size()


def ctx_tensors(root):
    """Tensors custom autograd functions keep on their ctx outside save_for_backward, which
    saved-tensor hooks do not see: the fused loss's gradients computed in forward
    (engine/ops/fused_loss.py, `ctx.grads`)."""
    out, stack, visited = [], [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        out += [t for t in getattr(node, "grads", None) or () if isinstance(t, torch.Tensor)]
        stack += [n for n, _ in node.next_functions]
    return out


def saved_bytes(trainer, batch):
    """Bytes of the distinct storages autograd holds for backward at the end of one micro-batch's
    forward (saved tensors and the fused loss's gradients on its ctx), parameters (sharded, or
    gathered by FSDP and not yet resharded) excluded: what the planner calls the saved
    activations (no checkpointing: its hooks would replace these)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage()._cdata] = t.untyped_storage()
        return t

    batch = trainer.prepare_batch(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast():
        losses = trainer.model.loss_sums(batch)
    for t in ctx_tensors(sum(losses.values()).grad_fn):
        seen[t.untyped_storage()._cdata] = t.untyped_storage()
    params = {local(p).untyped_storage()._cdata for p in trainer.model.parameters()}
    total = sum(st.nbytes() for key, st in seen.items() if key not in params)
    sum(losses.values()).backward()  # completes FSDP's forward/backward state
    trainer.optimizer.zero_grad(set_to_none=True)
    return total


def main(out_path, argv):
    torch.set_num_threads(1)
    if os.environ.get("PLAN_BALANCED_ROUTING"):
        MoE.route = balanced_route
    tolerate_frozen_params()
    cfg = load_config(*parse_overrides(argv))
    ctx = init_distributed(cfg.parallel.backend, "cpu")
    trainer = Trainer(cfg, ctx)
    trainer.train_step()  # AdamW's states exist from here
    batch = trainer.data.micro_batches(trainer.step, cfg.data.global_batch_size, trainer.dp_rank, trainer.dims.dp,
                                       trainer.layout["micro_batch"])[0]
    ph = getattr(trainer.model, "ph", {})
    tokens = {name: int((batch.input_ids == pid).sum()) for name, pid in ph.items()}
    saved = saved_bytes(trainer, batch)
    # MemTracker, also under FSDP: FSDPMemTracker expects the root to be entered through
    # __call__, while the trainer enters through loss_sums. FSDP's gathered parameters and
    # unsharded gradients then count as Activation / Temp (the planner's FSDP buffers).
    tracker = MemTracker()
    tracker.track_external(trainer.model, trainer.optimizer)
    STATS.reset()
    with tracker:
        trainer.forward_backward()
    comm = {f"{op}/{axis}": n for (op, axis), n in STATS.bytes.items()}
    peak = {str(k.value if hasattr(k, "value") else k): v for k, v in tracker.get_tracker_snapshot("peak")[
        torch.device("cpu")].items()}
    params = [p for p in trainer.model.parameters()]
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    optim = sum(nbytes(v) for state in trainer.optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    result = {"params": sum(nbytes(p) for p in params), "grads": grads, "optimizer": optim,
              "activations": peak.get("Activation", 0) + peak.get("Temp", 0),
              "saved": saved, "peak": peak, "comm": comm,
              "payload_tokens": tokens, "layout": trainer.layout}
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump(result, f)
    trainer.close()
    del trainer, tracker, params
    gc.collect()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
