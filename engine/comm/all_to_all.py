"""Autograd-aware all-to-all, even or uneven, synchronous or asynchronous.

`all_to_all_single_autograd(x, out_splits, in_splits)`: rows of `x` are sent in blocks of
`in_splits` to ranks 0..n-1; blocks of `out_splits` rows arrive from them. Its backward is
the same exchange with the splits swapped. `all_to_all(x, scatter_dim, gather_dim)` is the
Ulysses form built on it: split `x` along `scatter_dim`, send chunk i to rank i, and
concatenate what arrives along `gather_dim`.

`start_*` functions are the scheduling primitive: they launch the exchange and return a
pending object at once, so the caller computes while bytes are in flight and calls
`.wait()` when it needs the result. In backward the pair works the other way round: the
gradient exchange is launched when the result's gradient arrives and waited on only when
the input's gradient is needed, so it overlaps with whatever autograd runs in between.
On gloo the exchange runs on the backend's own thread; on NCCL on its own CUDA stream.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.distributed import ProcessGroup

from .collectives import all_to_all_single, group_size

Splits = Optional[Sequence[int]]


def _launch(x: torch.Tensor, out_splits: Splits, in_splits: Splits, group, axis: str, async_op: bool):
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    recv = x.new_empty((rows, *x.shape[1:]))
    out_s = None if out_splits is None else list(out_splits)
    in_s = None if in_splits is None else list(in_splits)
    work = all_to_all_single(recv, x, out_s, in_s, group=group, axis=axis, async_op=async_op)
    return recv, work


class _AllToAllSingle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, axis):
        ctx.args = (out_splits, in_splits, group, axis)
        return _launch(x, out_splits, in_splits, group, axis, async_op=False)[0]

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits, group, axis = ctx.args
        return _launch(grad, in_splits, out_splits, group, axis, async_op=False)[0], None, None, None, None


def all_to_all_single_autograd(x: torch.Tensor, out_splits: Splits = None, in_splits: Splits = None,
                               group: Optional[ProcessGroup] = None, axis: str = "world") -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _AllToAllSingle.apply(x, out_splits, in_splits, group, axis)


class _State:
    """Splits and work handles shared by one Start/Wait pair, forward and backward."""

    def __init__(self, out_splits, in_splits, group, axis):
        self.out_splits, self.in_splits, self.group, self.axis = out_splits, in_splits, group, axis
        self.fwd_work = self.bwd_work = self.bwd_recv = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state: _State):
        ctx.state = state
        recv, state.fwd_work = _launch(x, state.out_splits, state.in_splits, state.group, state.axis, True)
        return recv  # filled in by the backend; read only after _Wait

    @staticmethod
    def backward(ctx, _carrier):
        state = ctx.state
        state.bwd_work.wait()
        grad_x, state.bwd_work, state.bwd_recv = state.bwd_recv, None, None
        return grad_x, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recv, state: _State):
        ctx.state = state
        state.fwd_work.wait()
        state.fwd_work = None
        return recv.view_as(recv)

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        state.bwd_recv, state.bwd_work = _launch(grad, state.in_splits, state.out_splits, state.group, state.axis,
                                                 True)
        # The input's gradient travels through `state` (its row count differs when splits are
        # uneven); autograd gets `grad` back only to schedule _Start's backward after this.
        return grad, None


class PendingAllToAll:
    """An exchange in flight; `.wait()` returns the received rows (autograd-aware)."""

    def __init__(self, x: torch.Tensor, out_splits: Splits, in_splits: Splits, group, axis: str, finish=None):
        self._state = _State(out_splits, in_splits, group, axis)
        self._recv = _Start.apply(x, self._state)
        self._finish = finish

    def wait(self) -> torch.Tensor:
        out = _Wait.apply(self._recv, self._state)
        return out if self._finish is None else self._finish(out)


class _Ready:
    def __init__(self, x: torch.Tensor):
        self._x = x

    def wait(self) -> torch.Tensor:
        return self._x


def start_all_to_all_single(x: torch.Tensor, out_splits: Splits = None, in_splits: Splits = None,
                            group: Optional[ProcessGroup] = None, axis: str = "world"):
    if group_size(group) == 1:
        return _Ready(x)
    return PendingAllToAll(x, out_splits, in_splits, group, axis)


# ---- Ulysses form: scatter one dim, gather another ---------------------------------------

def _pack(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """[..., n*c (at dim), ...] -> [n, ..., c, ...]: row block i goes to rank i."""
    assert x.shape[dim] % n == 0, f"dim {dim} of {tuple(x.shape)} is not divisible by {n}"
    return torch.stack(x.chunk(n, dim=dim))


def _unpack(received: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, ...] from ranks 0..n-1 -> concatenated along `dim`."""
    return torch.cat(received.unbind(0), dim=dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Optional[ProcessGroup] = None,
               axis: str = "world") -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    return _unpack(all_to_all_single_autograd(_pack(x, scatter_dim, n), group=group, axis=axis), gather_dim)


def start_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Optional[ProcessGroup] = None,
                     axis: str = "world"):
    """Launch now, `.wait()` later (see the module docstring)."""
    n = group_size(group)
    if n == 1:
        return _Ready(x)
    return PendingAllToAll(_pack(x, scatter_dim, n), None, None, group, axis,
                           finish=lambda recv: _unpack(recv, gather_dim))
