"""`data.num_workers`: the coming steps' batches built in background processes.

`BackgroundData(build, num_workers, ...)` is a DataSource wrapping the one `build()` makes.
Each worker process (spawned, never forked: the trainer already runs torch and gloo
threads) calls `build()` once (a picklable zero-argument callable such as
`functools.partial(build_train_data, cfg)`, so memmaps and tokenizers are opened in the
worker, never pickled) and computes whole steps: step s goes to worker s % num_workers.
Asking for step s returns what `build().micro_batches(s, ...)` returns in the training
process, bit for bit (same dtypes, shapes and strides; the tensors live in shared memory),
and keeps steps s+1 .. s + prefetch * num_workers in flight. A step outside that window
(the first call, a resume, a jump) re-targets the window there: queued steps outside it
are cancelled, results outside it dropped. Batches are a pure function of the step, so no
result is ever wrong, only unneeded. Not thread-safe: one training thread asks.

Errors: an exception in a worker is raised in the training process when its step is asked
for (a build error: by `wait_ready` or the first call), as the same type with the same
message (a DataError still prints one line, exit code 2; a DataError or ConfigError
subclass that does not pickle back arrives as its base class, same message); the worker's
traceback is its `__cause__`. A worker that dies without one (killed, out of memory) is a
DataError naming it and its exit code, noticed within a second, never a hang. Workers are
daemons that ignore SIGINT and SIGTERM (the training process handles them and closes them) and exit
on their own when the training process goes away (their pipe's end of file, or a changed
parent pid). `close()` (also run when the object is collected, and at interpreter exit)
stops and reaps them all; it is idempotent.

`skipped_counts()`: the source's counts right after its build (identical in every
worker: a build is deterministic) plus, for every step delivered to the caller, what
building that step added to its worker's counts. After the steps of a run (from its start
or its resume point) this equals the in-process source's cumulative count whatever
num_workers and prefetch are, provided a source counts a bad sample when it builds the
step that holds it, or at build time (as the built-in sources do: too-long and unreadable
rows at build, media that fails to decode each time a step draws it; omni_digits at
build). Steps built ahead but not yet delivered are not counted. A source whose counts depend on what it
built before (counting a bad sample only the first time it meets it) can count more than
in-process: each worker remembers only its own steps.

Cost, measured on a 2-core CPU machine (torch 2.13 CPU; conversations of the fine-tuning
example's files):
- start-up, until a worker can build steps: ~3.7 s alone (starting python 0.15 s; importing
  torch 1.7 s and engine.data.sources 1.8 s, most of it torch._dynamo, which
  engine/models -> engine/ops/moe.py pulls in; building the source 0.01 s from a prepared
  folder, ~4 s for omni_digits). N workers start at once: on fewer than N + 1 free cores
  they share them (2 workers beside another busy process: ~7 s). The trainer starts them
  right after the parallel layout, so this overlaps the model build; `wait_ready` logs it.
  A launching script's own top-level imports are re-run in every worker (spawn):
  pretrain_omni.py imports nothing heavy at module level.
- memory per worker: ~220 MB private (USS; ~240 MB PSS, 300 MB RSS), what a python with
  torch and the engine's models imported takes; the token shards are memory-mapped (page
  cache, shared), plus up to prefetch * num_workers + 1 steps' batches in shared memory.
- per step, in the training process: ~0.3-0.5 ms to take a step that is ready (one
  message, one file descriptor, the tensors rebuilt as views of one buffer), against
  1.5-2 ms to build a step of 2 x 4 x 256 tokens in-process, ~60 ms for 8 x 8 x 1024,
  ~25 ms for an omni_digits step, ~120 ms for 4 conversations with small images and audio
  clips to decode (tests/test_data_workers.py's media data). Workers pay off when
  building a step costs more than a few ms (media decoding, large packed batches); for a
  short run on cheap token data they mostly add start-up time.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.reduction import recv_handle, send_handle

from .errors import DataError

log = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a wait checks that the worker it waits on is alive
_WARN_S = 120.0  # a step slower than this logs a warning (then every _WARN_S)


class _RemoteTraceback(Exception):
    """The worker's traceback, set as the `__cause__` of an exception raised in a worker."""

    def __str__(self) -> str:
        return self.args[0]


def _exit_reason(code) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code}; out of memory?)"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


class BackgroundData:
    """A DataSource whose steps are built by `num_workers` spawned processes (see the module doc)."""

    def __init__(self, build: Callable[[], object], num_workers: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, micro_batch_size: int, prefetch: int = 2):
        if num_workers < 1 or prefetch < 1:
            raise ValueError(f"BackgroundData needs num_workers >= 1 and prefetch >= 1, got {num_workers}, {prefetch}")
        try:
            payload = pickle.dumps(build)
        except Exception as e:
            raise TypeError(f"the data source's build callable must pickle (spawned workers rebuild the source): "
                            f"{e}; use a module-level function or functools.partial of one") from None
        import torch.multiprocessing as tmp  # torch's reductions, for tensors _pack leaves to pickle

        ctx = tmp.get_context("spawn")
        self.num_workers, self.prefetch = num_workers, prefetch
        self._layout = (global_batch_size, dp_rank, dp_size, micro_batch_size)
        self._conns, self._procs = [], []
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        self._t0 = time.time()
        for w in range(num_workers):
            here, there = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker_main, args=(there, payload, os.getpid()),
                               name=f"omni-data-worker-{w}", daemon=True)
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
        self._requested: dict[tuple, int] = {}  # key -> worker, asked and not yet received
        self._results: dict[tuple, tuple] = {}  # key -> ("built", batches, delta) | ("error", ...)
        self.startup: dict[int, dict[str, float]] = {}  # worker -> seconds: spawn, imports, build, total
        self._build_error = None
        self._base: dict[str, int] | None = None  # the source's skipped counts right after build
        self._delivered: dict[str, int] = {}  # what the delivered steps added
        self._broken: DataError | None = None
        self._eof: set[int] = set()  # workers whose pipe is closed

    # ---- the DataSource contract ---------------------------------------------------------
    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        self._check_usable()
        self._layout = (global_batch_size, dp_rank, dp_size, micro_batch_size)
        key = (step, *self._layout)
        self._retarget(step)
        while key not in self._results:
            self._receive(self._requested[key], key)
            if self._build_error is not None:
                raise self._exception(self._build_error)
        result = self._results.pop(key)
        if result[0] == "error":
            raise self._exception(result[1:])
        _, batches, delta = result
        for k, v in delta.items():
            self._delivered[k] = self._delivered.get(k, 0) + v
        return batches

    def skipped_counts(self) -> dict[str, int]:
        self._check_usable()
        while self._base is None:
            self._receive(0, None)
            self._check_usable()
        out = dict(self._base)
        for k, v in self._delivered.items():
            out[k] = out.get(k, 0) + v
        return out

    # ---- life cycle ------------------------------------------------------------------------
    def wait_ready(self) -> float:
        """Wait until every worker has built its source (raising a build error as the
        source would); returns the seconds since the workers were started."""
        self._check_usable()
        for w in range(self.num_workers):
            while w not in self.startup:
                self._receive(w, None)
                self._check_usable()
        return max(t["total"] for t in self.startup.values())

    def close(self) -> None:
        """Stop the workers and reap them (idempotent; also on collection and at exit)."""
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if not self._finalizer.alive:
            raise RuntimeError("BackgroundData is closed")
        if self._build_error is not None:
            raise self._exception(self._build_error)

    def _retarget(self, step: int) -> None:
        """Keep exactly the steps step .. step + prefetch * num_workers of the current layout
        asked for: cancel queued steps outside that window, drop their results."""
        window = [(s, *self._layout) for s in range(step, step + self.prefetch * self.num_workers + 1)]
        inside = set(window)
        for key in [k for k in self._results if k not in inside]:
            del self._results[key]
        stale = [k for k in self._requested if k not in inside]
        for key in stale:
            del self._requested[key]
        by_worker: dict[int, list] = {}
        for key in stale:
            by_worker.setdefault(key[0] % self.num_workers, []).append(key)
        for w, keys in by_worker.items():
            self._send(w, ("cancel", keys))
        for key in window:
            if key not in self._results and key not in self._requested:
                w = key[0] % self.num_workers
                self._requested[key] = w
                self._send(w, ("get", key))

    def _send(self, w: int, message) -> None:
        try:
            self._conns[w].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # a dead worker: the wait for its next result reports it

    def _receive(self, w: int, key) -> None:
        """Wait (checking that worker `w` lives) until some message arrives, and take in
        every message waiting from any worker."""
        proc, since, warned = self._procs[w], time.monotonic(), _WARN_S
        while True:
            live = [c for i, c in enumerate(self._conns) if i not in self._eof]
            ready = wait([*live, proc.sentinel], timeout=_POLL_S)
            got = False
            for i, conn in enumerate(self._conns):
                while conn in ready and i not in self._eof and self._take(i, conn):
                    got = True
                    if not conn.poll():
                        break
            if got:
                return
            if w in self._eof or not proc.is_alive() and not self._conns[w].poll():
                proc.join(5.0)
                doing = f"building step {key[0]}" if key is not None else "building the data source"
                self._broken = DataError(
                    f"data worker {w} (pid {proc.pid}) died while {doing}: {_exit_reason(proc.exitcode)}; "
                    "see its output above, or set data.num_workers=0 to build batches in the training process")
                self.close()
                raise self._broken
            waited = time.monotonic() - since
            if waited >= warned:
                log.warning("data worker %d has been %s for %.0f s", w,
                            f"building step {key[0]}" if key is not None else "starting", waited)
                warned += _WARN_S

    def _take(self, w: int, conn) -> bool:
        """Receive one message from worker `w` (and a built step's buffer); False at its end of file."""
        try:
            message = conn.recv()
            fd = recv_handle(conn) if message[0] == "built" else None  # a step's buffer follows its message
        except (EOFError, ConnectionResetError, OSError, RuntimeError):  # RuntimeError: no descriptor came
            self._eof.add(w)
            return False
        kind = message[0]
        if kind == "ready":
            _, (entered, imports, build), base = message
            self.startup[w] = {"spawn": entered - self._t0, "imports": imports, "build": build,
                               "total": time.time() - self._t0}
            if self._base is None:
                self._base = base
            if len(self.startup) == self.num_workers:
                t = max(self.startup.values(), key=lambda t: t["total"])
                log.info("data: %d worker(s) ready in %.1f s (the slowest: %.1f s to start python, %.1f s of "
                         "imports, %.1f s to build the source)", self.num_workers, t["total"], t["spawn"],
                         t["imports"], t["build"])
        elif kind == "build_error":
            self._build_error = self._build_error or message[1:]
        elif self._requested.get(message[1]) != w:  # cancelled, or from an earlier window
            if fd is not None:
                os.close(fd)
        else:  # the step asked for: its batches, or its error
            del self._requested[message[1]]
            if kind == "built":
                _, key, packed, delta = message
                self._results[key] = ("built", _unpack(fd, *packed), delta)
            else:
                self._results[message[1]] = ("error", *message[2:])
        return True

    @staticmethod
    def _exception(error: tuple) -> BaseException:
        data, fallback, remote_tb = error
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = RuntimeError(fallback)
        exc.__cause__ = _RemoteTraceback(remote_tb)
        return exc


def _shutdown(procs: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except Exception:
            pass
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


# ---- a step's batches in one shared-memory buffer --------------------------------------------
# torch's reductions hand every tensor storage over on its own: a file descriptor fetched,
# when the trainer unpickles, from a thread of the worker, which waits for the GIL while the
# worker builds the next step (0.7-5 ms per storage). Instead a step's storages are copied
# into one shared-memory buffer (torch's file-descriptor shared memory, as its reductions
# use) whose descriptor follows the step's message on the same pipe, and the step's tensors
# are rebuilt as views of it: same dtype, shape, strides and storage offset, and tensors
# that shared a storage still share it.
_ALIGN = 64


def _pack(obj) -> tuple:
    """(the shared buffer, and what `_unpack` needs besides its descriptor: the buffer's size,
    the pickle of `obj` with its plain CPU tensors left out, and their layouts)."""
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch

    tensors: list = []

    class Pickler(ForkingPickler):
        def persistent_id(self, o):
            if type(o) is torch.Tensor and o.layout == torch.strided and o.device.type == "cpu" \
                    and not (o.requires_grad or o.is_quantized or o.is_conj() or o.is_neg()):
                tensors.append(o)
                return len(tensors) - 1
            return None  # anything else pickles as usual (torch's reductions for other tensors)

    out = io.BytesIO()
    Pickler(out, pickle.HIGHEST_PROTOCOL).dump(obj)
    regions: dict[tuple[int, int], tuple[int, object]] = {}  # storage -> (byte offset in the buffer, storage)
    total, layouts = 0, []
    for t in tensors:
        storage = t.untyped_storage()
        where = (storage.data_ptr(), storage.nbytes())
        if where not in regions:
            regions[where] = (total, storage)
            total += -(-storage.nbytes() // _ALIGN) * _ALIGN
        layouts.append((t.dtype, regions[where][0] // t.element_size() + t.storage_offset(), tuple(t.shape),
                        t.stride()))
    buffer = torch.UntypedStorage._new_using_fd_cpu(max(total, _ALIGN))
    flat = torch.empty(0, dtype=torch.uint8).set_(buffer)
    for offset, storage in regions.values():
        if storage.nbytes():
            flat[offset:offset + storage.nbytes()] = torch.empty(0, dtype=torch.uint8).set_(storage)
    return buffer, (buffer.nbytes(), out.getvalue(), layouts)


def _unpack(fd: int, size: int, data: bytes, layouts: list) -> object:
    """The object `_pack` packed, from its buffer's descriptor (closed here)."""
    import io

    import torch

    try:
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)
    finally:
        os.close(fd)
    tensors = [torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
               for dtype, offset, shape, stride in layouts]

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return tensors[pid]

    return Unpickler(io.BytesIO(data)).load()


# ---- the worker process ----------------------------------------------------------------------
def _portable(exc: BaseException) -> tuple[bytes, str, str]:
    """(the pickled exception, a fallback message, the traceback) as sent to the trainer."""
    remote_tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    fallback = f"{type(exc).__qualname__}: {exc}"
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # an exception that does not rebuild would fail in the trainer
    except Exception:  # a DataError or ConfigError subclass keeps its one-line message as its base class
        from engine.config import ConfigError

        kind = next((k for k in (ConfigError, DataError) if isinstance(exc, k)), None)
        data = pickle.dumps(kind(str(exc)) if kind else RuntimeError(fallback))
    return data, fallback, remote_tb


def _worker_main(conn, payload: bytes, parent: int) -> None:
    _serve(conn, payload, parent)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing to tear down: skip the interpreter's finalisation (about 0.5 s with torch)


def _serve(conn, payload: bytes, parent: int) -> None:
    entered, t0 = time.time(), time.perf_counter()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C and SIGTERM are the training process's to handle (Slurm's scancel and a process-group
    # kill reach the workers too): it saves at the next step boundary, which needs their batches,
    # then closes them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch
    import torch.multiprocessing  # shared-memory reductions for tensors _pack leaves to pickle

    torch.set_num_threads(1)
    try:
        build = pickle.loads(payload)  # imports the modules the source is built from
        t1 = time.perf_counter()
        source = build()
        base = dict(source.skipped_counts())
    except BaseException as e:  # noqa: BLE001 (sent to the trainer, which raises it)
        _send_or_exit(conn, ("build_error", *_portable(e)))
        _wait_for_stop(conn)
        return
    _send_or_exit(conn, ("ready", (entered, t1 - t0, time.perf_counter() - t1), base))
    pending: deque = deque()
    while True:
        while not pending or conn.poll():
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the training process is gone
            if message is None:
                return
            kind, arg = message
            if kind == "get":
                pending.append(arg)
            else:  # cancel
                dropped = set(arg)
                pending = deque(k for k in pending if k not in dropped)
        key = pending.popleft()
        try:
            before = source.skipped_counts()
            buffer, packed = _pack(source.micro_batches(*key))
            after = source.skipped_counts()
            delta = {k: v - before.get(k, 0) for k, v in after.items() if k not in before or v != before[k]}
            message = ("built", key, packed, delta)
        except Exception as e:  # noqa: BLE001
            message = ("error", key, *_portable(e))
        _send_or_exit(conn, message)
        if message[0] == "built":
            _send_or_exit(conn, buffer)  # in flight, its descriptor keeps the memory for the trainer
        buffer = message = packed = None
        if os.getppid() != parent:
            return


def _send_or_exit(conn, message) -> None:
    """Send a message, or a shared buffer's file descriptor; exit when the trainer is gone."""
    try:
        if isinstance(message, tuple):
            conn.send(message)
        else:
            send_handle(conn, message._share_fd_cpu_()[0], os.getppid())
    except (BrokenPipeError, ConnectionResetError, OSError):
        sys.exit(0)  # the training process is gone


def _wait_for_stop(conn) -> None:
    try:
        while conn.recv() is not None:
            pass
    except (EOFError, OSError):
        pass
