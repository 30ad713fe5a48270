"""Parallel degrees -> a validated DeviceMesh with named axes.

World mesh axes (row-major, outermost first): dp_replicate x dp_shard x sp. Derived views:
- `dp`       = dp_replicate x dp_shard: ranks that see different data;
- `fsdp`     = dp_shard x sp (flattened, `dp_shard_sp`), or the 2-D HSDP mesh
               (dp_replicate, dp_shard_sp) when dp_replicate > 1: where parameters are sharded;
- `sp`       = the Ulysses group (ranks that share data and split the sequence).
`ep` / `ep_fsdp` are carved out of dp_shard x sp by the expert-parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    sp: int
    ep: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "sp", "ep"):
            assert getattr(self, name) >= 1, f"{name} must be resolved before building ParallelDims"
        assert self.dp_replicate * self.dp_shard * self.sp == self.world_size, "degrees must multiply to world size"
        assert (self.dp_shard * self.sp) % self.ep == 0, "ep must divide dp_shard x sp"

    @classmethod
    def from_layout(cls, layout: dict[str, int], world_size: int) -> "ParallelDims":
        return cls(layout["dp_replicate"], layout["dp_shard"], layout["sp"], layout["ep"], world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.sp > 1 or self.dp_replicate > 1

    def build_replicate_mesh(self, device_type: str) -> DeviceMesh:
        """(world, 1): HSDP with a one-rank shard axis, i.e. a whole copy on every rank and
        gradients all-reduced over the world (the `replicate` recipe of omni parts)."""
        return init_device_mesh(device_type, (self.world_size, 1), mesh_dim_names=("replicate_all", "unsharded"))

    def build_meshes(self, device_type: str) -> "Meshes":
        world = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.sp),
                                 mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        dp = world["dp_replicate", "dp_shard"]._flatten("dp")
        shard = world["dp_shard", "sp"]._flatten("dp_shard_sp")
        if self.dp_replicate > 1:
            fsdp = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard * self.sp),
                                    mesh_dim_names=("dp_replicate", "dp_shard_sp"))
        else:
            fsdp = shard
        meshes = Meshes(world=world, dp=dp, fsdp=fsdp, sp=world["sp"])
        if self.ep > 1:
            from .expert_parallel import build_ep_meshes

            meshes.ep, meshes.expert_fsdp, meshes.expert_global = build_ep_meshes(device_type, self.dp_replicate, self.dp_shard * self.sp,
                                                            self.ep)
        return meshes


@dataclass
class Meshes:
    world: DeviceMesh
    dp: DeviceMesh
    fsdp: DeviceMesh
    sp: DeviceMesh
    ep: Optional[DeviceMesh] = None
    expert_fsdp: Optional[DeviceMesh] = None
    expert_global: Optional[DeviceMesh] = None

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()
