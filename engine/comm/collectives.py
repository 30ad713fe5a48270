"""Every collective the engine issues, with bytes counted per collective and per mesh axis.

Byte counts are what one rank sends over the wire with the usual ring / pairwise
algorithms (the "bus bytes" of nccl-tests): all_reduce 2(n-1)/n x size, all_gather and
reduce_scatter (n-1)/n x the full size, all_to_all the bytes sent to other ranks.
Single-process calls (group of size 1 or no process group) are no-ops and count nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class CommStats:
    """Counters of bytes and calls, keyed by (collective, axis)."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, op: str, axis: str, nbytes: int) -> None:
        self.bytes[(op, axis)] += int(nbytes)
        self.calls[(op, axis)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def by_axis(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (_, axis), n in self.bytes.items():
            out[axis] += n
        return dict(out)

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (op, _), n in self.bytes.items():
            out[op] += n
        return dict(out)

    def total(self) -> int:
        return sum(self.bytes.values())


STATS = CommStats()


def group_size(group: Optional[ProcessGroup]) -> int:
    if not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group: Optional[ProcessGroup] = None, axis: str = "world",
               op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False):
    n = group_size(group)
    if n == 1:
        return None
    STATS.add("all_reduce", axis, 2 * (n - 1) * _nbytes(t) // n)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group: Optional[ProcessGroup] = None,
                           axis: str = "world", async_op: bool = False):
    n = group_size(group)
    if n == 1:
        out.copy_(inp.reshape(out.shape))
        return None
    STATS.add("all_gather", axis, (n - 1) * _nbytes(inp))
    return dist.all_gather_into_tensor(out, inp, group=group, async_op=async_op)


def reduce_scatter_tensor(out: torch.Tensor, inp: torch.Tensor, group: Optional[ProcessGroup] = None,
                          axis: str = "world", op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False):
    n = group_size(group)
    if n == 1:
        out.copy_(inp.reshape(out.shape))
        return None
    STATS.add("reduce_scatter", axis, (n - 1) * _nbytes(out))
    return dist.reduce_scatter_tensor(out, inp, op=op, group=group, async_op=async_op)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, out_splits: Optional[list[int]] = None,
                      in_splits: Optional[list[int]] = None, group: Optional[ProcessGroup] = None,
                      axis: str = "world", async_op: bool = False):
    n = group_size(group)
    if n == 1:
        out.copy_(inp)
        return None
    row = _nbytes(inp) // max(inp.shape[0], 1)
    if in_splits is None:
        sent = (n - 1) * _nbytes(inp) // n
    else:
        sent = (sum(in_splits) - in_splits[dist.get_rank(group)]) * row
    STATS.add("all_to_all", axis, sent)
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def broadcast_object(obj, src: int = 0, group: Optional[ProcessGroup] = None):
    if group_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Optional[ProcessGroup] = None) -> None:
    if group_size(group) > 1:
        dist.barrier(group=group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's input is the sum of all ranks' output
    gradients (each rank's value was used by every rank)."""

    @staticmethod
    def forward(ctx, t, group, axis):
        ctx.args = (group, axis)
        out = t.clone()
        all_reduce(out, group, axis)
        return out

    @staticmethod
    def backward(ctx, grad):
        group, axis = ctx.args
        grad = grad.clone()
        all_reduce(grad, group, axis)
        return grad, None, None


def all_reduce_autograd(t: torch.Tensor, group: Optional[ProcessGroup] = None, axis: str = "world") -> torch.Tensor:
    if group_size(group) == 1:
        return t
    return _AllReduceSum.apply(t, group, axis)
