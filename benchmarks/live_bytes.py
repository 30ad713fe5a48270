"""Peak live tensor bytes of one process, by storage, with a breakdown at the peak.

`LiveBytes` is a `TorchDispatchMode`: every storage that an aten op returns is counted
from the moment it appears until its last reference dies (a weakref callback on the
`UntypedStorage`), at its real size (`nbytes()` of the storage, not of the view).
Storages alive when the mode is entered (parameters, buffers, anything else reachable
from `gc`) form the baseline. `UntypedStorage.resize_` is wrapped while the mode is
active, because FSDP2 allocates and frees its unsharded parameters that way (outside
the dispatcher). DTensors are counted through their local tensor.

What this counts: bytes of tensors, as a caching allocator with no fragmentation would
hold them. What it does not count: scratch memory that a kernel allocates internally and
never returns as a tensor (SDPA's per-thread blocks on CPU, gloo's buffers), allocator
rounding or caching, Python objects. `torch.distributed._tools.mem_tracker.MemTracker`
works the same way; this one also records *which* tensors are live at the peak.

    with LiveBytes(budget=2 << 30) as mem:   # budget: raise BudgetExceeded past it
        step()
    mem.peak, mem.peak_breakdown()
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class BudgetExceeded(RuntimeError):
    pass


def _local(t: torch.Tensor, meta: bool = False) -> Optional[torch.Tensor]:
    local = getattr(t, "_local_tensor", None)  # DTensor
    if local is not None:
        t = local
    if (t.is_meta and not meta) or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return t


class LiveBytes(TorchDispatchMode):
    def __init__(self, budget: Optional[int] = None, snapshot_margin: float = 0.002, meta: bool = False):
        """meta: count meta-device tensors too (sizes without allocating; off by default, so
        that a model still on meta does not count)."""
        super().__init__()
        self.meta = meta
        self.budget = budget
        self.snapshot_margin = snapshot_margin
        self._live: dict[int, list] = {}  # storage id -> [nbytes, tag, weakref, shape]
        self.current = 0
        self.peak = 0
        self.baseline = 0
        self._snap_at = 0
        self._snapshot: list[tuple[int, str, tuple]] = []
        self.peak_tag = ""  # the allocation that set the peak
        self.exceeded = False

    # ---- bookkeeping ----------------------------------------------------------------------
    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def _track(self, t: torch.Tensor, tag: str) -> None:
        t = _local(t, self.meta)
        if t is None:
            return
        st = t.untyped_storage()
        key = st._cdata
        n = st.nbytes()
        entry = self._live.get(key)
        if entry is None:
            ref = weakref.ref(st, lambda _r, k=key, self=weakref.ref(self): self() and self()._release(k))
            self._live[key] = [n, tag, ref, tuple(t.shape)]
            self.current += n
        elif entry[0] != n:  # resized in place
            self.current += n - entry[0]
            entry[0] = n
        self._update_peak(tag)

    def _update_peak(self, tag: str) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_tag = tag
            if self.peak > self._snap_at * (1 + self.snapshot_margin):
                self._snap_at = self.peak
                self._snapshot = [(e[0], e[1], e[3]) for e in self._live.values()]
            if self.budget is not None and self.peak > self.budget and not self.exceeded:
                self.exceeded = True
                raise BudgetExceeded(f"live tensor bytes {self.peak / 2**20:.1f} MiB > budget "
                                     f"{self.budget / 2**20:.1f} MiB")

    # ---- mode -----------------------------------------------------------------------------
    def __enter__(self):
        gc.collect()
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                try:
                    self._track(obj, "baseline (parameters, buffers, inputs)")
                except (RuntimeError, NotImplementedError, BudgetExceeded):
                    pass
        self.baseline = self.current
        self._orig_resize = orig = torch.UntypedStorage.resize_
        me = self

        def resize_(st, size):
            out = orig(st, size)
            entry = me._live.get(st._cdata)
            if entry is not None:
                me.current += st.nbytes() - entry[0]
                entry[0] = st.nbytes()
                me._update_peak(entry[1] + " (storage resize_)")
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        phase = "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, f"{phase} {func.overloadpacket.__name__} {list(t.shape)} {str(t.dtype)[6:]}")
        return out

    # ---- report ---------------------------------------------------------------------------
    def peak_breakdown(self, top: int = 8) -> list[dict]:
        """Tensors live at (within snapshot_margin of) the peak, grouped by creating op/shape/dtype."""
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for n, tag, _ in self._snapshot:
            groups[tag][0] += n
            groups[tag][1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
        return [{"tensor": tag, "count": c, "bytes": b} for tag, (b, c) in rows[:top]]

    def bytes_at_peak(self, predicate) -> int:
        """Bytes of the tensors live at the peak whose shape satisfies `predicate(shape)`."""
        return sum(n for n, _, shape in self._snapshot if predicate(shape))
