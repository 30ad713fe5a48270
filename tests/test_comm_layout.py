"""The fake backend: one process as rank r of N, for layout checks with no real traffic."""

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, torch
from engine.comm import STATS, all_reduce, init_distributed, shutdown
from engine.config import load_config, resolve_layout
from engine.models import build_backbone
from engine.parallel import ParallelDims, materialize, parallelize

cfg = load_config("examples/configs/tiny_dense.yaml",
                  [("parallel.backend", "fake"), ("parallel.fake_world_size", "8"), ("parallel.fake_rank", "5"),
                   ("parallel.dp_replicate", "2"), ("data.global_batch_size", "8")])
ctx = init_distributed(cfg.parallel.backend, "cpu", cfg.parallel.fake_world_size, cfg.parallel.fake_rank)
layout = resolve_layout(cfg, ctx.world_size)
dims = ParallelDims.from_layout(layout, ctx.world_size)
meshes = dims.build_meshes("cpu")
with torch.device("meta"):
    model = build_backbone(cfg.model)
full = {n: list(p.shape) for n, p in model.named_parameters()}
parallelize(model, cfg, dims, meshes, "cpu")
materialize(model, ctx.device, 0)
local = {n: p.to_local().numel() for n, p in model.named_parameters()}
t = torch.zeros(1000)
all_reduce(t, meshes.fsdp["dp_shard_sp"].get_group(), axis="dp_shard_sp")
print(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "layout": layout, "full": full, "local": local,
                  "fsdp_mesh": list(meshes.fsdp.mesh_dim_names), "dp_rank": meshes.dp_rank,
                  "bytes": STATS.by_axis()}))
shutdown()
"""


def test_fake_backend_builds_hsdp_layout_and_shards_every_parameter():
    import json

    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["world"] == 8 and out["rank"] == 5
    assert out["layout"]["dp_shard"] == 4 and out["layout"]["dp"] == 8
    assert out["fsdp_mesh"] == ["dp_replicate", "dp_shard_sp"]  # HSDP: replicate x shard
    assert out["dp_rank"] == 5  # rank 5 = replica 1, shard 1 -> data slice 5 of 8
    # No rank holds a full parameter: shard 1 of 4 keeps rows [c, 2c) of each tensor, c = ceil(rows / 4).
    total_full = 0
    for name, shape in out["full"].items():
        rows, per_row = shape[0], math.prod(shape[1:])
        c = -(-rows // 4)
        assert out["local"][name] == max(0, min(2 * c, rows) - c) * per_row, name
        total_full += rows * per_row
    assert sum(out["local"].values()) <= total_full / 4 + 64
    # all_reduce over 4 ranks of 4000 bytes moves 2 * 3/4 * 4000 bytes per rank
    assert out["bytes"] == {"dp_shard_sp": 6000}
