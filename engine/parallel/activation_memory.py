"""Activation-memory levers, applied from outside the model: checkpointing (none, full,
selective) of the backbone's blocks and of each part's repeated layers, and offload of the
tensors saved for backward to host memory.

- `full`: each block runs under non-reentrant `torch.utils.checkpoint`; only its inputs stay
  alive, the whole block runs again in backward (collectives inside it too, as before).
- `selective`: op-level selective checkpointing (`create_selective_checkpoint_contexts`, the
  policy of torchtitan and Megatron): the outputs of matmuls, attention kernels and random
  ops are kept, the cheap ops between them (norms, activations, elementwise, softmax,
  reshapes) run again in backward. Collectives are never sent again: the eager c10d
  collectives write into a buffer and return a `Work`, which SAC's cache cannot hold, so a
  dispatch mode below SAC's keeps each collective's received buffer in forward and copies it
  into the recomputed buffer in backward (Ulysses' and EP's all-to-alls, the router
  statistics' all-reduce); functional collectives (torch.compile) are saved by the policy.
- Per part (`model.encoders[i].activation_checkpointing`, decoders alike): the same modes on
  the part's repeated layers, i.e. the elements of its outermost `nn.ModuleList`s (vision
  blocks, audio layers, the VQ tokenizer's levels), through the composable `checkpoint` (forward
  hooks: parameter names do not change). An encoder without a ModuleList is checkpointed whole.
- Offload (`parallel.activation_offload`): saved-tensor hooks around the model's `loss_sums`
  copy each saved activation to pinned host memory on a side CUDA stream (overlapped with the
  forward compute) and back on that stream when backward needs it (the compute stream then
  waits for the side stream, not for the host). Parameters (and views of them, e.g. the transposed weight a matmul
  saves), tensors below `MIN_OFFLOAD_BYTES` and tensor subclasses stay where they are. Tensors
  already on the host are kept as they are (on a CPU run offload changes nothing) unless
  `FORCE_HOST_COPY`, with which tests and the benchmark exercise the copy path on CPU. What a
  checkpointed region keeps (its inputs, SAC's cache) does not go through saved-tensor hooks,
  so offload acts on what is saved outside checkpointed regions.

Order in `parallelize`: checkpointing before compile (the checkpoint becomes part of the
compiled block) and before FSDP (the checkpoint runs inside the FSDP unit, whose gather
happens before the recompute), offload around the whole forward.
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from engine.config import ConfigError, checkpointing_mode


SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::_scaled_mm",
    "aten::_scaled_grouped_mm", "aten::convolution",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "torch_attn::_varlen_attn",
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
    # functional collectives (what torch.compile traces): communication is never repeated
    "_c10d_functional::all_to_all_single", "_c10d_functional::all_reduce",
    "_c10d_functional::all_gather_into_tensor", "_c10d_functional::reduce_scatter_tensor",
})
"""Ops (any overload) whose outputs selective checkpointing keeps: matmuls, convolutions,
attention kernels. By name, so that kernels registered later (flash-attn, varlen) count."""

RANDOM_OPS = frozenset({
    "aten::native_dropout", "aten::bernoulli", "aten::bernoulli_", "aten::rand", "aten::rand_like", "aten::randn",
    "aten::randn_like", "aten::randint", "aten::randint_like", "aten::randperm", "aten::normal", "aten::normal_",
    "aten::uniform_", "aten::exponential_", "aten::multinomial",
})
"""Random ops are kept too: run again they would draw other numbers (blocks are checkpointed
without saving the RNG state)."""


@functools.lru_cache(maxsize=None)
def _kept(func) -> bool:
    name = getattr(func, "name", None)
    name = name().split(".")[0] if callable(name) else ""
    return name in SAVED_OPS or name in RANDOM_OPS


def selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _kept(func) else CheckpointPolicy.PREFER_RECOMPUTE


# ---- eager collectives under selective checkpointing --------------------------------------

def _is_c10d(func) -> bool:
    return getattr(func, "namespace", None) == "c10d"


class _CollectiveMode(TorchDispatchMode):
    """A mode that enters SAC's own (`inner`) above itself: SAC sees each op first, and what SAC
    runs (a collective marked for recompute) reaches this mode. One object per side, as
    checkpoint expects of a `context_fn`."""

    def __init__(self, log: deque, inner: TorchDispatchMode):
        super().__init__()
        self.log, self.inner = log, inner

    @classmethod
    def ignore_compile_internals(cls):
        return True

    def __enter__(self):
        super().__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.inner.__exit__(*exc)
        finally:
            super().__exit__(*exc)


class _RecordCollectives(_CollectiveMode):
    """Forward of a checkpointed region: each eager collective runs, and its output buffer
    (argument 0, written in place) and its result are kept, in call order."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _is_c10d(func):
            buffers = [t for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor)]
            # Not a copy: an async collective fills its buffer later; versions catch later writes.
            self.log.append((func, buffers, [t._version for t in buffers], out))
        return out


class _ReplayCollectives(_CollectiveMode):
    """Recompute of that region: each collective is answered from the record, in order,
    without communicating (the data are what the forward received)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_c10d(func):
            return func(*args, **(kwargs or {}))
        if not self.log or self.log[0][0] != func:
            expected = self.log[0][0] if self.log else "none"
            raise RuntimeError(f"selective checkpointing: recompute issued {func} where the forward issued "
                               f"{expected}; the collectives of a checkpointed block must not depend on state "
                               "that changes between forward and backward")
        _, saved, versions, out = self.log.popleft()
        if [t._version for t in saved] != versions:
            raise RuntimeError(f"selective checkpointing: the output of {func} was modified in place after the "
                               "collective, so its received data are gone; checkpoint this block with `full`")
        fresh = [t for t in tree_leaves(args[0]) if isinstance(t, torch.Tensor)]
        assert len(fresh) == len(saved), (func, len(fresh), len(saved))
        for dst, src in zip(fresh, saved):
            dst.copy_(src)
        swap = {id(s): f for s, f in zip(saved, fresh)}
        return tree_map(lambda x: swap.get(id(x), x) if isinstance(x, torch.Tensor) else x, out)


def selective_contexts():
    """`context_fn` of a selectively checkpointed region: SAC's caching modes, each above a mode
    that records (forward) or replays (recompute) the eager collectives. SAC marks a collective
    for recompute, so in backward it reaches the replay, which answers without communicating.
    A region torch.compile traces whole gets SAC's modes alone (its partitioner reads their tags):
    collectives traced there are functional ones, which the policy saves. A region that breaks
    the graph runs eagerly, with the replay."""
    forward, recompute = create_selective_checkpoint_contexts(selective_policy)
    if torch.compiler.is_compiling():
        return forward, recompute
    log: deque = deque()
    return _RecordCollectives(log, forward), _ReplayCollectives(log, recompute)


# ---- where checkpointing applies ------------------------------------------------------------

def apply_block_checkpointing(blocks: nn.ModuleDict, mode: str) -> None:
    """Wrap every block of `blocks` (in place) for checkpointing `mode`."""
    if mode == "none":
        return
    extra = {} if mode == "full" else {"context_fn": selective_contexts}
    for name, block in list(blocks.items()):
        blocks[name] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)


def repeated_layers(part: nn.Module) -> list[nn.Module]:
    """The elements of the outermost nn.ModuleLists inside `part`, in module order."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                walk(child)

    walk(part)
    return found


def apply_part_checkpointing(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Each omni part's own `activation_checkpointing` on its repeated layers (composable
    checkpoint: names unchanged). Returns {part: checkpointed modules}."""
    applied = {}
    parts = model.parts()
    for name, part in parts.items():
        kind, i = model._where[name]
        key = f"model.{kind}[{i}].activation_checkpointing"
        mode = checkpointing_mode(model.specs[name].get("activation_checkpointing", False), key)
        if mode == "none":
            continue
        units = repeated_layers(part)
        if not units:
            if kind == "decoders":  # the omni model calls a decoder's methods directly, not __call__
                raise ConfigError(f"config key '{key}' ({name}): this decoder has no repeated layers (no "
                                  "nn.ModuleList) to checkpoint; set it to none")
            units = [part]
        extra = {} if mode == "full" else {"context_fn": selective_contexts}
        for unit in units:
            composable_checkpoint(unit, preserve_rng_state=False, **extra)
        applied[name] = units
    return applied


# ---- offload to host memory ------------------------------------------------------------------

MIN_OFFLOAD_BYTES = 1024
"""Smaller saved tensors stay on the device: their copies cost more than they save."""
FORCE_HOST_COPY = False
"""Copy saved tensors that already live on the host too (tests, benchmark): the copy path then
runs on a CPU machine."""


@dataclass
class _Offloaded:
    device: torch.device
    host: torch.Tensor
    stream: Optional["torch.cuda.Stream"] = None
    back: Optional[weakref.ref] = None  # the copy back, while backward still holds it


class ActivationOffload:
    """Saved-tensor hooks that keep activations in host memory between forward and backward.
    A tensor saved by several ops (a block input read by three projections) is copied once.
    Counts saves moved (`packed`), brought back (`unpacked`) and the bytes copied (`bytes`)."""

    def __init__(self, force_copy: Optional[bool] = None):
        self.force_copy = FORCE_HOST_COPY if force_copy is None else force_copy
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._seen: dict[int, tuple[weakref.ref, int, _Offloaded]] = {}  # this forward's copies by tensor id
        self.packed = self.unpacked = self.bytes = 0

    @contextmanager
    def hooks(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._seen.clear()

    def _stays(self, t: torch.Tensor) -> bool:
        return (type(t) is not torch.Tensor or isinstance(t._base, nn.Parameter) or t.layout != torch.strided
                or t.nbytes < MIN_OFFLOAD_BYTES or (t.device.type != "cuda" and not self.force_copy))

    def pack(self, t: torch.Tensor):
        if self._stays(t):
            return t
        self.packed += 1
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            return seen[2]
        self.bytes += t.nbytes
        if t.device.type != "cuda":
            packed = _Offloaded(t.device, self._host_copy(t))
        else:
            stream = self._streams.get(t.device)
            if stream is None:
                stream = self._streams[t.device] = torch.cuda.Stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before it is read
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # its memory is not reused before the copy has read it
            packed = _Offloaded(t.device, host, stream)
        self._seen[id(t)] = (weakref.ref(t), t._version, packed)
        return packed

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The host copy of a tensor that already lives on the host (FORCE_HOST_COPY)."""
        return t.detach().clone()

    def _back_from_host(self, host: torch.Tensor) -> torch.Tensor:
        """A host copy back for backward, where compute runs on the host: the copy itself."""
        return host

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        self.unpacked += 1
        out = packed.back() if packed.back is not None else None
        if out is not None:  # a second op reading the same saved tensor
            return out
        if packed.stream is None:
            out = self._back_from_host(packed.host)
        else:
            with torch.cuda.stream(packed.stream):  # queued after its own D2H copy on that stream
                out = packed.host.to(packed.device, non_blocking=True)
            current = torch.cuda.current_stream(packed.device)
            current.wait_stream(packed.stream)
            out.record_stream(current)
        packed.back = weakref.ref(out)
        return out


def apply_activation_offload(model: nn.Module, offload: Optional[ActivationOffload] = None) -> ActivationOffload:
    """Run `model.loss_sums` (the trainer's entry point) under `offload`'s hooks; returns it."""
    offload = offload or ActivationOffload()
    inner = model.loss_sums

    @functools.wraps(inner)
    def loss_sums(*args, **kwargs):
        with offload.hooks():
            return inner(*args, **kwargs)

    model.loss_sums = loss_sums
    return offload
