"""Process-group backends by name: nccl (CUDA), gloo (CPU), fake (one process as N ranks).

`init_distributed` works in a plain single process (no process group at all), under
torchrun / `python -m torch.distributed.run` (one node or many: it reads the standard
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables), and with the fake
backend for layout tests and dry runs, where collectives move no data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "none" for a plain single process

    @property
    def is_distributed(self) -> bool:
        return self.backend != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_env_backend(name: str) -> Callable[[int, int], None]:
    def init(rank: int, world_size: int) -> None:
        dist.init_process_group(name, rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    return init


def _init_fake(rank: int, world_size: int) -> None:
    # torch's own fake process group: every collective returns immediately.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


BACKENDS: dict[str, Callable[[int, int], None]] = {
    "nccl": _init_env_backend("nccl"),
    "gloo": _init_env_backend("gloo"),
    "fake": _init_fake,
}


def register_backend(name: str, init: Callable[[int, int], None]) -> None:
    """Add a backend (e.g. a vendor collective library) under `name`."""
    BACKENDS[name] = init


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device' is cuda but no CUDA device is visible; "
                          "use --train.device=cpu or auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def init_distributed(backend: str = "auto", device: str = "auto", fake_world_size: int = 1,
                     fake_rank: int = 0) -> DistContext:
    dev = resolve_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ConfigError(f"config key 'parallel.backend' is {backend!r}, which is not registered; choose one of "
                          f"{', '.join(sorted(BACKENDS))} or auto")
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError(f"config key 'parallel.backend' is nccl, which needs CUDA devices, but the device is "
                          f"{dev.type}; use --parallel.backend=gloo (or auto) on CPU")
    if backend == "fake":
        rank, world, local = fake_rank, fake_world_size, 0
        if not 0 <= rank < world:
            raise ConfigError(f"config key 'parallel.fake_rank'={rank} must be in [0, parallel.fake_world_size="
                              f"{world})")
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if world == 1 and "MASTER_ADDR" not in os.environ:
            return DistContext(0, 1, 0, dev, "none")
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        BACKENDS[backend](rank, world)
    return DistContext(rank, world, local, dev, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
