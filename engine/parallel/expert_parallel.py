"""Expert parallelism: shard experts over an `ep` axis, dispatch tokens with all-to-all.

Mesh: the dp_shard x sp ranks (flattened, N of them) are viewed as (ep_fsdp, ep) with ep
innermost, so an EP group is ep consecutive ranks. Each EP rank owns num_experts / ep
experts (rows of the fused [E, ...] tensors, i.e. Shard(0) over `ep`); FSDP then shards
those over `ep_fsdp` (and replicates over dp_replicate), while every other parameter is
sharded over all N ranks as usual.

Dispatch (dropless): tokens are permuted by expert, per-expert counts are exchanged, the
rows go to their experts' owners with an uneven `all_to_all_single`, are regrouped by
local expert, run through one grouped GEMM, and travel back the same way. The overlapped
dispatcher cuts the tokens into chunks: every chunk's exchange is launched up front, and
chunk i's experts compute while chunk i+1's rows (and chunk i-1's results) are in flight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from engine.comm import all_reduce_autograd, all_to_all_single, start_all_to_all_single
from engine.models.moe import Experts
from engine.ops.moe import permute, unpermute


def build_ep_meshes(device_type: str, dp_replicate: int, dp_shard_sp: int, ep: int) -> tuple[DeviceMesh, ...]:
    """(ep mesh, FSDP mesh of expert weights, mesh of the global expert tensors).

    Axis order (dp_replicate, ep, ep_fsdp): a global [E, ...] expert tensor is then exactly
    Shard(0) over ep followed by Shard(0) over ep_fsdp (FSDP's shard of the EP rank's rows),
    which is how checkpoints store it (see `global_expert_placements`).
    """
    mesh = init_device_mesh(device_type, (dp_replicate, ep, dp_shard_sp // ep),
                            mesh_dim_names=("dp_replicate", "ep", "ep_fsdp"))
    fsdp = mesh["dp_replicate", "ep_fsdp"] if dp_replicate > 1 else mesh["ep_fsdp"]
    return mesh["ep"], fsdp, (mesh if dp_replicate > 1 else mesh["ep", "ep_fsdp"])


def global_expert_placements(mesh: DeviceMesh) -> tuple:
    lead = (Replicate(),) if mesh.ndim == 3 else ()
    return (*lead, Shard(0), Shard(0))


def globalize_expert_state(model: nn.Module, model_sd: dict, optim_sd: dict, mesh: DeviceMesh) -> dict:
    """Replace each rank's expert tensors (rows of its own experts, FSDP-sharded) in DCP
    state dicts by views of the global [E, ...] tensor, so that every rank's experts are
    saved (and a checkpoint reshards to any EP size). Values alias the originals; returns
    {key path: original} to put back after loading."""
    placements = global_expert_placements(mesh)
    originals = {}
    for mod_name, module in model.named_modules():
        rows = module.global_rows if isinstance(module, Experts) else None
        if not rows:
            continue
        prefix = mod_name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        for pname, (shape, _) in rows.items():
            fqn = f"{prefix}.{pname}"
            param_state = optim_sd.get("state", {}).get(fqn, {})
            targets = [(model_sd, fqn)] + [(param_state, k) for k, v in param_state.items()
                                          if isinstance(v, DTensor) and v.ndim == len(shape)]
            for container, key in targets:
                local = container[key]
                originals[(id(container), key)] = (container, key, local)
                stride = torch.empty(shape, device="meta").stride()
                container[key] = DTensor.from_local(local.to_local(), mesh, placements, run_check=False,
                                                    shape=torch.Size(shape), stride=stride)
    return originals


def restore_expert_state(originals: dict) -> None:
    for container, key, value in originals.values():
        container[key] = value


class AllToAllDispatcher:
    """The `MoE.dispatcher` hook under EP. chunks > 1 = the overlapped dispatcher."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int, chunks: int = 1):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        self.chunks = chunks

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [C, E] (chunk, global expert) -> received [ep(src), C, local experts]."""
        c = counts.shape[0]
        send = counts.view(c, self.ep, self.local_experts).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        all_to_all_single(recv, send, group=self.group, axis="ep")
        return recv

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: nn.Module):
        n_tok = x.shape[0]
        bounds = torch.linspace(0, n_tok, min(self.chunks, max(n_tok, 1)) + 1).round().long().tolist()
        pieces = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        perms = [permute(x[p], topk_idx[p], self.num_experts) for p in pieces]
        recv_counts = self._exchange_counts(torch.stack([counts for _, _, counts in perms]))

        # Launch every chunk's outbound exchange first.
        outbound, plans = [], []
        for i, (rows, _, counts) in enumerate(perms):
            rc = recv_counts[:, i]  # [src, local expert]
            in_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
            out_splits = rc.sum(1).tolist()
            outbound.append(start_all_to_all_single(rows, out_splits, in_splits, self.group, axis="ep"))
            # rows arrive ordered (src, local expert): sort them by local expert for the GEMM
            expert_of_row = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
            expert_of_row = expert_of_row.repeat_interleave(rc.flatten())
            plans.append((in_splits, out_splits, torch.argsort(expert_of_row, stable=True), rc.sum(0)))

        # Compute chunk by chunk, sending each result home as soon as it exists.
        inbound = []
        for pending, (in_splits, out_splits, regroup, per_expert) in zip(outbound, plans):
            received = pending.wait()
            y = experts.ffn(received[regroup], per_expert)
            y = y[torch.argsort(regroup)]  # back to (src, local expert) order
            inbound.append(start_all_to_all_single(y, in_splits, out_splits, self.group, axis="ep"))

        outs = [unpermute(p.wait(), order, topk_weight[piece], piece.stop - piece.start)
                for p, (_, order, _), piece in zip(inbound, perms, pieces)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def shard_experts(moe_layers: dict, ep_rank: int, ep: int) -> None:
    """Keep only this EP rank's experts (still on the meta device) and record, for
    materialisation, which rows of the global tensors they are."""
    for moe in moe_layers.values():
        experts = moe.experts
        local = experts.num_experts // ep
        experts.global_rows.clear()
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            experts.global_rows[name] = (tuple(full.shape), ep_rank * local)
            setattr(experts, name, nn.Parameter(torch.empty((local, *full.shape[1:]), device=full.device)))
        experts.num_experts = local


def apply_router_stats_reduction(moe_layers: dict, world_group, world_size: int) -> None:
    """Load-balancing statistics over every rank of the global batch (dp x sp)."""
    for moe in moe_layers.values():
        moe.reduce_router_stats = lambda t: all_reduce_autograd(t, world_group, axis="world")
        moe.aux_share = 1.0 / world_size


def apply_expert_parallel(moe_layers: dict, ep_mesh: DeviceMesh, num_experts: int, overlap_chunks: int) -> None:
    shard_experts(moe_layers, ep_mesh.get_local_rank(), ep_mesh.size())
    dispatcher = AllToAllDispatcher(ep_mesh, num_experts, chunks=overlap_chunks)
    for moe in moe_layers.values():
        moe.dispatcher = dispatcher
