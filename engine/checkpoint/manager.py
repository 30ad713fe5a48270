"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable exactly.

Layout: <output_dir>/checkpoints/step_00000042/
    *.distcp, .metadata     model + optimizer shards and the trainer state (DCP)
    rng_rank<r>.pt          each rank's RNG state (ranks differ, so not in DCP)
    MANIFEST.json           every file's size and sha256, written when all files are on disk
    COMPLETE                written last by rank 0 after every rank finished: a directory
                            without it (a crash mid-save) is never resumed from.

Two kinds of unusable checkpoint are kept apart on resume:
- damaged (a file missing, truncated, unreadable, or differing from MANIFEST.json): with
  `checkpoint.resume=auto` it is skipped with a warning and the next older complete one is
  tried; an explicit `checkpoint.resume=PATH` that is damaged is an error.
- not fitting the config (other parameter names or shapes): always an error, never skipped,
  so that a config mistake cannot silently restart training from an older step or from scratch.
Every rank takes the same decision (verdicts are all-reduced).

`checkpoint.keep_last: N` removes older complete checkpoints once a new one is complete;
`checkpoint.async_save` writes with `dcp.async_save` (the state is copied to CPU memory at
the save step, written in a background thread, and marked COMPLETE once on disk).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from engine.comm import DistContext, all_reduce, barrier
from engine.parallel.expert_parallel import globalize_expert_state, restore_expert_state

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
_CHUNK = 8 << 20
_OK, _DAMAGED, _MISFIT = 0, 1, 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory and the fix."""


class DamagedCheckpoint(Exception):
    """Internal: a checkpoint whose files are missing, truncated, unreadable or corrupt."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def _step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()),
                  reverse=True)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, newest first."""
    return [p for _, p in _step_dirs(output_dir) if (p / MARKER).is_file()]


def latest_complete(output_dir: Path) -> Optional[Path]:
    complete = complete_checkpoints(output_dir)
    return complete[0] if complete else None


# ---- manifest ------------------------------------------------------------------------------
def _listing(path: Path) -> list[str]:
    """The checkpoint's data files (what the manifest covers), sorted."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in (MARKER, MANIFEST)
                  and not p.name.endswith(".tmp"))


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # releases the GIL: a background hash does not stall training
    return h.hexdigest()


def _hash_files(path: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"size": (path / n).stat().st_size, "sha256": _sha256(path / n)} for n in names}


def _file_problem(file: Path, entry: dict) -> int:
    """0: matches its manifest entry; 1: missing or unreadable; 2: other size; 3: other contents."""
    try:
        if file.stat().st_size != entry["size"]:
            return 2
        return 0 if _sha256(file) == entry["sha256"] else 3
    except OSError:
        return 1


def _write_atomic(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _first_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException):  # wraps the per-rank failures
        inner = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        if inner:
            e = inner[0]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _shape(value) -> Optional[list[int]]:
    return list(value.size()) if isinstance(value, torch.Tensor) else None  # a DTensor's size is global


def _misfit(state: dict, metadata) -> Optional[str]:
    """Why the checkpoint (its DCP metadata) does not fit `state`, the model and optimizer of
    this config, or None. Names and shapes only: nothing is read but the metadata."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    shapes = [(k, list(saved[k].size), _shape(v)) for k, v in flat.items()
              if k in saved and isinstance(saved[k], TensorStorageMetadata) and _shape(v) is not None
              and list(saved[k].size) != _shape(v)]
    missing = [k for k in flat if k not in saved]
    extra = [k for k in saved if k.startswith("model.") and k not in flat]
    more = lambda n: f" (and {n - 1} more)" if n > 1 else ""  # noqa: E731
    if shapes:
        k, was, now = shapes[0]
        return f"{k} has shape {was} in the checkpoint but {now} in this config{more(len(shapes))}"
    if missing:
        return f"it has no {missing[0]}, which this config's model or optimizer has{more(len(missing))}"
    if extra:
        return f"it has {extra[0]}, which this config's model lacks{more(len(extra))}"
    return None


def _storage_problem(path: Path, metadata) -> Optional[str]:
    """A shard that DCP's metadata points into but that is missing or too short (truncated)."""
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if isinstance(name, str):
            needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} has {file.stat().st_size} bytes, its index needs {size} (truncated?)"
    return None


class CheckpointManager:
    def __init__(self, output_dir: str | Path, ctx: DistContext, interval: int, enabled: bool = True,
                 expert_mesh=None, keep_last: Optional[int] = None, async_save: bool = False):
        """`expert_mesh`: under expert parallelism, the mesh of the global expert tensors, so
        that expert weights are saved whole ([experts, ...]) rather than per EP rank.
        `keep_last`: keep only the newest N complete checkpoints (None or 0: all).
        `async_save`: write in the background (dcp.async_save); call `finish()` before exit."""
        self.expert_mesh = expert_mesh
        self.output_dir = Path(output_dir)
        self.ctx, self.interval, self.enabled = ctx, interval, enabled
        self.keep_last, self.async_save = keep_last or 0, async_save
        # Collectives only in a real process group (the fake backend moves no data).
        self._collective = dist.is_initialized() and ctx.backend != "fake" and dist.get_world_size() > 1
        self._rank, self._world = (ctx.rank, ctx.world_size) if self._collective else (0, 1)
        self._pending: Optional[tuple[Path, Future]] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._save_group = None
        if async_save and enabled and self._collective:
            # The background writer's collectives get their own (CPU-capable) group, apart from
            # the training collectives on the default group.
            self._save_group = dist.new_group(backend="gloo")
        self._candidates: list[Path] = []  # checkpoint.resume=auto: older complete checkpoints to fall back on
        self._skipped: list[str] = []
        self._resolved: Optional[Path] = None

    def should_save(self, step: int, last_step: int) -> bool:
        return self.enabled and (step == last_step or (self.interval > 0 and step % self.interval == 0))

    # ---- collectives -------------------------------------------------------------------
    def _reduce(self, value: int, op=dist.ReduceOp.MAX) -> int:
        if not self._collective:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.ctx.device)
        all_reduce(t, op=op)
        return int(t.item())

    def _gather(self, obj) -> list:
        if not self._collective:
            return [obj]
        out = [None] * self._world
        dist.all_gather_object(out, obj)
        return out

    # ---- save ----------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        """Save and (synchronous) mark complete; with async_save, return once the state is
        copied to CPU memory: it is written and marked complete in the background."""
        self.wait()  # at most one save in flight: the previous one is complete before this starts
        path = checkpoint_dir(self.output_dir, step)
        if self.ctx.is_main and path.exists():  # an incomplete earlier attempt at this step
            shutil.rmtree(path)
        barrier()
        path.mkdir(parents=True, exist_ok=True)
        # Before the shards: once DCP's save returns on rank 0, every rank's files are on disk.
        torch.save(_rng_state(), path / f"rng_rank{self.ctx.rank}.pt")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        originals = {} if self.expert_mesh is None else \
            globalize_expert_state(model, model_sd, optim_sd, self.expert_mesh)
        state = {"model": model_sd, "optim": optim_sd, "trainer": copy.deepcopy(trainer_state)}
        try:
            if self.async_save:  # copies the state to CPU memory now (values, not references)
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=self._save_group)
            else:
                dcp.save(state, checkpoint_id=str(path))
        finally:
            restore_expert_state(originals)  # the optimizer's own state dicts may have been edited
        if self.async_save:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
            self._pending = (path, self._executor.submit(self._complete_async, step, path, future))
            return path
        names = _listing(path)  # each rank hashes a share of the files; rank 0 writes the manifest
        parts = self._gather(_hash_files(path, names[self._rank::self._world]))
        if self.ctx.is_main:
            self._mark_complete(step, path, {k: v for part in parts for k, v in part.items()})
        barrier()
        return path

    def _complete_async(self, step: int, path: Path, future: Future) -> None:
        """Background thread: wait for DCP's writes, then (rank 0) manifest, COMPLETE, pruning."""
        future.result()
        if self.ctx.is_main:  # rank 0's DCP save returns only after every rank's writes finished
            self._mark_complete(step, path, _hash_files(path, _listing(path)))

    def _mark_complete(self, step: int, path: Path, files: dict[str, dict]) -> None:
        _write_atomic(path / MANIFEST, json.dumps({"step": step, "files": files}, indent=1, sort_keys=True))
        _write_atomic(path / MARKER, json.dumps({"step": step, "world_size": self.ctx.world_size}))
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Rank 0, once the checkpoint of `step` is complete: remove the complete checkpoints
        before it beyond the newest keep_last (it counts), and incomplete directories before it.
        Later ones (left by a run this one resumed before) are not touched."""
        dirs = [(s, p) for s, p in _step_dirs(self.output_dir) if s <= step]
        complete = [p for _, p in dirs if (p / MARKER).is_file()]
        old = complete[self.keep_last:] if self.keep_last else []
        stale = [p for s, p in dirs if s < step and not (p / MARKER).is_file()]
        for p in old + stale:
            (p / MARKER).unlink(missing_ok=True)  # a crash mid-removal leaves an incomplete dir, never a damaged one
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s checkpoint %s", "an older" if p in old else "the incomplete", p)

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is written and marked complete."""
        if self._pending is None:
            return
        path, future = self._pending
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            raise CheckpointError(f"asynchronous save of checkpoint {path} failed ({type(e).__name__}: "
                                  f"{_first_line(e)[:200]}); it is not marked {MARKER}: check free disk space "
                                  f"and permissions under {self.output_dir}") from e

    def finish(self, raise_errors: bool = True) -> None:
        """End of training: wait for the save in flight. raise_errors=False (cleanup after another
        error): a failed save is logged, not raised."""
        try:
            self.wait()
        except CheckpointError as e:
            if raise_errors:
                raise
            log.error("%s", e)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- resume --------------------------------------------------------------------------
    def verify(self, path: Path) -> Optional[str]:
        """None when the files of `path` match its MANIFEST.json (or it has none: saved before
        manifests), else why not. Ranks hash a share of the files each; all get the same answer."""
        try:
            files = json.loads((path / MANIFEST).read_text())["files"]
            names = sorted(files)
            if not all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()):
                raise ValueError("malformed entry")
            local = ""
        except FileNotFoundError:
            files, names, local = None, [], ""
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            files, names, local = None, [], f"{MANIFEST} is unreadable ({type(e).__name__})"
        if self._reduce(int(bool(local))):
            return local or f"{MANIFEST} is unreadable on another rank"
        if files is None:
            return None
        first = 4 * len(names)  # 4 * index of the first bad file + its problem
        for i in range(self._rank, len(names), self._world):
            if problem := _file_problem(path / names[i], files[names[i]]):
                first = 4 * i + problem
                break
        first = self._reduce(first, op=dist.ReduceOp.MIN)
        if first == 4 * len(names):
            return None
        name, problem = names[first // 4], first % 4
        if problem == 1:
            return f"{name} is missing or unreadable"
        if problem == 2:
            size = (path / name).stat().st_size if (path / name).is_file() else "?"
            return f"{name} has {size} bytes, its manifest says {files[name]['size']} (truncated?)"
        return f"{name} differs from its manifest (sha256): the file is corrupt"

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from. auto: the newest complete one whose files pass the
        manifest check (damaged ones are skipped with a warning); None: start fresh."""
        self._candidates, self._skipped, self._resolved = [], [], None
        if resume == "none":
            return None
        if resume == "auto":
            self._candidates = complete_checkpoints(self.output_dir)
            if not self._candidates:
                return None
            self._resolved = self._next_candidate()
            return self._resolved
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {MARKER} file): "
                                  "it was interrupted while saving; resume from an earlier step_* directory")
        if reason := self.verify(path):
            raise self._damaged_error(path, reason)
        return path

    def _damaged_error(self, path: Path, reason: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is damaged and could not be loaded ({reason}): point "
                               "checkpoint.resume at another step_* directory, or use checkpoint.resume=auto "
                               "to take the newest intact one")

    def _skip(self, path: Path, reason: str) -> None:
        self._skipped.append(f"{path.name}: {reason}")
        if self.ctx.is_main:
            log.warning("checkpoint %s is damaged (%s): skipping it, trying the previous complete checkpoint",
                        path, reason)

    def _next_candidate(self) -> Path:
        """The newest remaining auto candidate that passes its manifest check."""
        while self._candidates:
            path = self._candidates.pop(0)
            reason = self.verify(path)
            if reason is None:
                return path
            self._skip(path, reason)
        raise CheckpointError(f"checkpoint.resume=auto: every complete checkpoint in {self.output_dir / 'checkpoints'} "
                              f"is damaged and could not be loaded ({'; '.join(self._skipped)[:400]}): restore them "
                              "from a backup, or start over with checkpoint.resume=none or another train.output_dir")

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        """Restore in place; returns the saved trainer state. With checkpoint.resume=auto a
        checkpoint found damaged while loading is skipped for the next older one (whatever was
        half loaded is overwritten by the next load)."""
        while True:
            try:
                return self._load_one(path, model, optimizer, trainer_state)
            except DamagedCheckpoint as e:
                if self._resolved is None or path != self._resolved:
                    raise self._damaged_error(path, str(e)) from e
                self._skip(path, str(e))
                path = self._resolved = self._next_candidate()
                if self.ctx.is_main:
                    log.warning("falling back to checkpoint %s", path)

    def _load_one(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        originals = {} if self.expert_mesh is None else \
            globalize_expert_state(model, model_sd, optim_sd, self.expert_mesh)
        state = {"model": model_sd, "optim": optim_sd, "trainer": dict(trainer_state)}
        verdict, reason, rng = _OK, "", None
        try:
            try:  # 1. the metadata is readable and fits this config (no tensor read yet)
                metadata = dcp.FileSystemReader(str(path)).read_metadata()
            except Exception as e:
                verdict, reason = _DAMAGED, f"{type(e).__name__} reading .metadata: {_first_line(e)[:200]}"
            else:
                if misfit := _misfit(state, metadata):
                    verdict, reason = _MISFIT, misfit
                elif problem := _storage_problem(path, metadata):
                    verdict, reason = _DAMAGED, problem
            agreed = self._reduce(verdict)
            if agreed == _MISFIT:
                raise CheckpointError(f"checkpoint {path} could not be loaded: it does not fit this config "
                                      f"({reason if verdict == _MISFIT else 'on another rank'}): resume with the "
                                      "config it was saved with, or start over with checkpoint.resume=none or "
                                      "another train.output_dir")
            if agreed == _DAMAGED:
                raise DamagedCheckpoint(reason or "unreadable on another rank")
            rng_file, what = path / f"rng_rank{self.ctx.rank}.pt", "the DCP shards"
            try:  # 2. the tensors and this rank's RNG state: any failure now is damage
                dcp.load(state, checkpoint_id=str(path))
                what = rng_file.name
                rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
            except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
                verdict, reason = _DAMAGED, f"{what} unreadable, {type(e).__name__}: {_first_line(e)[:200]}"
            if self._reduce(verdict):
                raise DamagedCheckpoint(reason or "unreadable on another rank")
        finally:
            restore_expert_state(originals)  # the global views wrote into these in place
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if rng is not None:
            _set_rng_state(rng)
        else:
            log.warning("no RNG state for rank %d in %s (different world size?); RNG not restored",
                        self.ctx.rank, path)
        return state["trainer"]
