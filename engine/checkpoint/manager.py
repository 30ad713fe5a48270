"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable exactly.

Layout: <output_dir>/checkpoints/step_00000042/
    *.distcp, .metadata     model + optimizer shards and the trainer state (DCP)
    rng_rank<r>.pt          each rank's RNG state (ranks differ, so not in DCP)
    COMPLETE                written last by rank 0 after every rank finished: a directory
                            without it (a crash mid-save) is never resumed from.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from engine.comm import DistContext, barrier
from engine.parallel.expert_parallel import globalize_expert_state, restore_expert_state

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory and the fix."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def latest_complete(output_dir: Path) -> Optional[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return max(steps)[1] if steps else None


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


class CheckpointManager:
    def __init__(self, output_dir: str | Path, ctx: DistContext, interval: int, enabled: bool = True,
                 expert_mesh=None):
        """`expert_mesh`: under expert parallelism, the mesh of the global expert tensors, so
        that expert weights are saved whole ([experts, ...]) rather than per EP rank."""
        self.expert_mesh = expert_mesh
        self.output_dir = Path(output_dir)
        self.ctx, self.interval, self.enabled = ctx, interval, enabled

    def should_save(self, step: int, last_step: int) -> bool:
        return self.enabled and (step == last_step or (self.interval > 0 and step % self.interval == 0))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
        path = checkpoint_dir(self.output_dir, step)
        if self.ctx.is_main and path.exists():  # an incomplete earlier attempt at this step
            shutil.rmtree(path)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        originals = {} if self.expert_mesh is None else \
            globalize_expert_state(model, model_sd, optim_sd, self.expert_mesh)
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": trainer_state}, checkpoint_id=str(path))
        restore_expert_state(originals)  # the optimizer's own state dicts may have been edited
        torch.save(_rng_state(), path / f"rng_rank{self.ctx.rank}.pt")
        barrier()
        if self.ctx.is_main:
            (path / MARKER).write_text(json.dumps({"step": step, "world_size": self.ctx.world_size}))
        barrier()
        return path

    def resolve_resume(self, resume: str) -> Optional[Path]:
        if resume == "none":
            return None
        if resume == "auto":
            return latest_complete(self.output_dir)
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {MARKER} file): "
                                  "it was interrupted while saving; resume from an earlier step_* directory")
        return path

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        """Restore in place; returns the saved trainer state."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        originals = {} if self.expert_mesh is None else \
            globalize_expert_state(model, model_sd, optim_sd, self.expert_mesh)
        state = {"model": model_sd, "optim": optim_sd, "trainer": dict(trainer_state)}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
            first = _first_line(e)
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first[:200]}); "
                                  "it may be corrupt or from a different model config: use checkpoint.resume=none "
                                  "or point checkpoint.resume at another step_* directory") from e
        restore_expert_state(originals)  # the global views wrote into these in place
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        rng_file = path / f"rng_rank{self.ctx.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log.warning("no RNG state for rank %d in %s (different world size?); RNG not restored",
                        self.ctx.rank, path)
        return state["trainer"]
