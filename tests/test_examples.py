"""examples/run_*.sh: every launch script's layout is possible for the world it launches
(checked from its DRY_RUN command, so the 128-GPU script is checked on a CPU), and the
4-process CPU script that composes FSDP, Ulysses SP and EP really runs and matches one
process."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config, parse_overrides, resolve_layout
from engine.models import build_model
from launch import ROOT, assert_close, losses, train

SCRIPTS = sorted((ROOT / "examples").glob("run_*.sh"))


def dry_run(script: Path, **env) -> list[str]:
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "DRY_RUN": "1", "MASTER_ADDR": "node0", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def world_and_args(cmd: list[str]) -> tuple[int, list[str]]:
    at = next(i for i, a in enumerate(cmd) if a.endswith("pretrain_omni.py"))
    flags = dict(a[2:].split("=", 1) for a in cmd[1:at] if a.startswith("--") and "=" in a)
    assert cmd[0] in ("python", "torchrun"), cmd
    world = int(flags.get("nnodes", 1)) * int(flags.get("nproc-per-node", 1))
    return world, cmd[at + 1:]


def test_there_are_scripts_from_one_cpu_to_128_gpus():
    names = {s.name for s in SCRIPTS}
    assert {"run_omni_cpu.sh", "run_omni_moe_128gpu.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_layout_fits_the_launched_world(script):
    world, args = world_and_args(dry_run(script))
    cfg = load_config(*parse_overrides(args))
    layout = resolve_layout(cfg, world)
    assert layout["dp"] * layout["sp"] == world  # dp = dp_replicate x dp_shard
    if "gpu" in script.name:
        assert cfg.train.dtype == "bf16" and cfg.train.device in ("auto", "cuda")


def test_128gpu_script_is_a_32b_hsdp_sp_ep_run():
    cmd = dry_run(ROOT / "examples" / "run_omni_moe_128gpu.sh")
    assert cmd[:2] == ["torchrun", "--nnodes=16"] and "--rdzv-endpoint=node0:29500" in cmd
    world, args = world_and_args(cmd)
    cfg = load_config(*parse_overrides(args))
    assert world == 128
    assert resolve_layout(cfg, world) == {"dp_replicate": 2, "dp_shard": 16, "sp": 4, "ep": 8, "dp": 32,
                                          "local_batch": 8, "micro_batch": 1, "grad_accum": 8}
    with torch.device("meta"):
        model = build_model(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    assert 31e9 < params < 33e9, params  # Qwen3-30B-A3B backbone (30.5B) + 1.4B of parts
    # another node count must be a one-line layout error, not a hang at rendezvous
    world, args = world_and_args(dry_run(ROOT / "examples" / "run_omni_moe_128gpu.sh", NNODES="2"))
    with pytest.raises(ConfigError, match="parallel layout impossible"):
        resolve_layout(load_config(*parse_overrides(args)), world)


def test_composed_cpu_script_runs_and_matches_one_process(tmp_path):
    """FSDP (dp_shard 2 x sp 2) + Ulysses SP 2 + EP 2 on the MoE omni model, launched by the
    example script: the losses of one process (fp32)."""
    short = ["--train.steps=2", "--checkpoint.enabled=false", "--train.progress_bar=false",
             "--train.tensorboard=false", "--data.seq_len=127"]
    out = tmp_path / "script"
    proc = subprocess.run(["bash", str(ROOT / "examples" / "run_omni_moe_sp_ep_4cpu.sh"), *short,
                           f"--train.output_dir={out}"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    composed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    one = train(tmp_path / "one", 1, *short, config=str(ROOT / "examples" / "configs" / "tiny_omni_moe.yaml"))
    assert_close(losses(composed), losses(one), rel=1e-5)
    assert_close([r["loss_image_vq"] for r in composed], [r["loss_image_vq"] for r in one], rel=1e-5)
    # seq_len 127 makes SP pad every row by one token: padding stays out of the router's
    # statistics, so routing counts and the load-balancing loss are the one-process ones.
    assert [r["moe_tokens_per_expert"] for r in composed] == [r["moe_tokens_per_expert"] for r in one]
    assert_close([r["aux_loss"] for r in composed], [r["aux_loss"] for r in one], rel=1e-5)
