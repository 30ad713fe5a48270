"""Autograd-aware all-to-all (sync and async) over a process group.

`all_to_all(x, scatter_dim, gather_dim)`: split `x` into n chunks along `scatter_dim`,
send chunk i to rank i, and concatenate what arrives along `gather_dim` in rank order.
Its backward is the inverse all-to-all (scatter `gather_dim`, gather `scatter_dim`).

`start_all_to_all(...)` is the scheduling primitive: it launches the exchange and returns a
`PendingAllToAll` at once, so the caller computes while bytes are in flight and calls
`.wait()` when it needs the result. In backward the pair works the other way round: the
gradient exchange is launched when the result's gradient arrives and waited on only when
the input's gradient is needed, so it overlaps with whatever autograd runs in between.
On gloo the exchange runs on the backend's own thread; on NCCL on its own CUDA stream.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed import ProcessGroup

from .collectives import all_to_all_single, group_size


def _pack(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """[..., n*c (at dim), ...] -> [n, ..., c, ...] contiguous: row block i goes to rank i."""
    return torch.stack(x.chunk(n, dim=dim)).contiguous()


def _unpack(received: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, ...] from ranks 0..n-1 -> concatenated along `dim`."""
    return torch.cat(received.unbind(0), dim=dim)


def _launch(x: torch.Tensor, scatter_dim: int, group, axis: str, async_op: bool):
    n = group_size(group)
    assert x.shape[scatter_dim] % n == 0, f"dim {scatter_dim} of {tuple(x.shape)} not divisible by {n}"
    send = _pack(x, scatter_dim, n)
    recv = torch.empty_like(send)
    work = all_to_all_single(recv, send, group=group, axis=axis, async_op=async_op)
    return recv, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, axis):
        ctx.args = (scatter_dim, gather_dim, group, axis)
        recv, _ = _launch(x, scatter_dim, group, axis, async_op=False)
        return _unpack(recv, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, axis = ctx.args
        recv, _ = _launch(grad, gather_dim, group, axis, async_op=False)
        return _unpack(recv, scatter_dim), None, None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Optional[ProcessGroup] = None,
               axis: str = "world") -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, axis)


class _State:
    """Work handles shared by a Start/Wait pair (forward and backward)."""

    def __init__(self, scatter_dim, gather_dim, group, axis):
        self.scatter_dim, self.gather_dim, self.group, self.axis = scatter_dim, gather_dim, group, axis
        self.fwd_work = self.bwd_work = None


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state: _State):
        ctx.state = state
        recv, state.fwd_work = _launch(x, state.scatter_dim, state.group, state.axis, async_op=True)
        return recv  # filled in by the backend; only read after _Wait

    @staticmethod
    def backward(ctx, grad_recv):
        state = ctx.state
        state.bwd_work.wait()
        state.bwd_work = None
        return _unpack(grad_recv, state.scatter_dim), None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recv, state: _State):
        ctx.state = state
        state.fwd_work.wait()
        state.fwd_work = None
        return _unpack(recv, state.gather_dim)

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        recv, state.bwd_work = _launch(grad, state.gather_dim, state.group, state.axis, async_op=True)
        return recv, None


class PendingAllToAll:
    def __init__(self, x: torch.Tensor, scatter_dim: int, gather_dim: int, group, axis: str):
        self._state = _State(scatter_dim, gather_dim, group, axis)
        self._recv = _Start.apply(x, self._state)

    def wait(self) -> torch.Tensor:
        return _Wait.apply(self._recv, self._state)


class _Done:
    def __init__(self, x: torch.Tensor):
        self._x = x

    def wait(self) -> torch.Tensor:
        return self._x


def start_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Optional[ProcessGroup] = None,
                     axis: str = "world"):
    """Launch now, `.wait()` later (see the module docstring)."""
    if group_size(group) == 1:
        return _Done(x)
    return PendingAllToAll(x, scatter_dim, gather_dim, group, axis)
