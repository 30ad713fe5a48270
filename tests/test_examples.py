"""examples/run_*.sh: every launch script's layout is possible for the world it launches
(checked from its DRY_RUN command, so the 128-GPU script is checked on a CPU), and the
4-process CPU script that composes FSDP, Ulysses SP and EP really runs and matches one
process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

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


# ---- every launch script's exact layout, one optimizer step on the fake backend ----------
# One process plays rank 0 of the script's world (torch's fake process group: collectives
# return at once, so the numbers are not the real run's; the shapes, meshes, wrappers,
# hooks and schedules are). The 128-GPU model keeps every width (hidden 2048, 128 experts,
# the 151,936-word vocabulary and its tokenizer, the 1280-wide vision and audio towers, the
# 384-pixel VQ decoder) with depth and sequence cut so it fits this machine.
def _reduced_flagship(path: Path) -> Path:
    tree = yaml.safe_load((ROOT / "examples" / "configs" / "omni_moe_30b_a3b.yaml").read_text())
    tree["model"]["num_layers"] = 2
    for enc in tree["model"]["encoders"]:
        for depth_key in ("depth", "encoder_layers"):
            if depth_key in enc:
                enc[depth_key] = 2
    # 32 sequences = one per data-parallel rank: one micro-batch instead of 8, same layout
    tree["data"].update(seq_len=1024, global_batch_size=32)
    path.write_text(yaml.safe_dump(tree))
    return path


def _fake_launch(script: Path, tmp_path: Path, timeout: int) -> tuple[int, dict, str]:
    world, args = world_and_args(dry_run(script))
    if script.name == "run_omni_moe_128gpu.sh":
        at = args.index("--config")
        args[at + 1] = str(_reduced_flagship(tmp_path / "flagship_reduced.yaml"))
    cmd = [sys.executable, str(ROOT / "pretrain_omni.py"), *args, "--parallel.backend=fake",
           f"--parallel.fake_world_size={world}", "--train.device=cpu", "--train.steps=1",
           "--checkpoint.enabled=false", "--train.progress_bar=false", "--train.tensorboard=false",
           f"--train.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 1
    return world, records[0], proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_128gpu_layout_trains_one_step_at_full_width_on_fake_backend(tmp_path):
    world, record, log = _fake_launch(ROOT / "examples" / "run_omni_moe_128gpu.sh", tmp_path, timeout=840)
    assert world == 128
    assert ("layout {'dp_replicate': 2, 'dp_shard': 16, 'sp': 4, 'ep': 8, 'dp': 32, 'local_batch': 1, "
            "'micro_batch': 1, 'grad_accum': 1}, world 128") in log
    assert record["tokens"] == 32 * 1024
    # rank 0's share of the routing: every one of the 128 experts counted in both MoE layers
    assert sorted(record["moe_tokens_per_expert"]) == ["blocks.0", "blocks.1"]
    assert all(len(v) == 128 for v in record["moe_tokens_per_expert"].values())
    assert record["mem_gb"] > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name != "run_omni_moe_128gpu.sh"],
                         ids=[s.stem for s in SCRIPTS if s.name != "run_omni_moe_128gpu.sh"])
@pytest.mark.slow
def test_launch_script_layout_trains_one_step_on_fake_backend(tmp_path, script):
    world, record, log = _fake_launch(script, tmp_path, timeout=540)
    assert f"world {world}, device cpu" in log and record["tokens"] > 0


# ---- Slurm: examples/run_omni_moe_128gpu.sbatch, with stub srun / scontrol on PATH ----------
SBATCH = ROOT / "examples" / "run_omni_moe_128gpu.sbatch"
_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then for i in $(seq 0 15); do echo "gpu-node$i"; done; fi
"""
# srun that runs until SIGTERM, then exits as the engine does after its step-boundary save
_SRUN = """#!/usr/bin/env bash
trap 'echo "srun: SIGTERM" >> "$STUB_LOG"; exit 0' TERM
echo "srun $*" >> "$STUB_LOG"
for _ in $(seq 600); do sleep 0.1; done
exit "${SRUN_RC:-0}"
"""


def slurm_env(tmp_path: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", _SCONTROL), ("srun", _SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
            "SLURM_JOB_NODELIST": "gpu-node[0-15]", "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "16",
            "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def test_sbatch_is_16_nodes_of_torchrun_with_rendezvous_on_the_first_node(tmp_path):
    header = dict(line[len("#SBATCH --"):].split("=", 1) if "=" in line else (line[len("#SBATCH --"):], "")
                  for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH --"))
    assert header["nodes"] == "16" and header["ntasks-per-node"] == "1" and header["gpus-per-node"] == "8"
    assert "requeue" in header and header["signal"] == "B:TERM@120"
    proc = subprocess.run(["bash", str(SBATCH), "--train.steps=7"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=slurm_env(tmp_path, DRY_RUN="1"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index("--- on each node:")
    srun, torchrun = lines[:at], lines[at + 1:]
    assert srun[:4] == ["srun", "--nodes=16", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--rdzv-backend=c10d" in torchrun and "--rdzv-endpoint=gpu-node0:29500" in torchrun
    assert "--rdzv-id=omni-moe-42" in torchrun
    world, args = world_and_args(torchrun)
    assert world == 128 and args[-1] == "--train.steps=7"
    # the same run as the plain launch script's
    assert world_and_args(dry_run(ROOT / "examples" / "run_omni_moe_128gpu.sh"))[1] == args[:-1]
    cfg = load_config(*parse_overrides(args))
    assert cfg.checkpoint.resume == "auto" and resolve_layout(cfg, world)["dp"] * cfg.parallel.sp_size == world


def test_sbatch_forwards_sigterm_and_requeues_after_the_save(tmp_path):
    env = slurm_env(tmp_path)
    proc = subprocess.Popen(["bash", str(SBATCH)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log"
    for _ in range(100):  # until srun runs
        if log.exists() and "srun --nodes=16" in log.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch shell
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = log.read_text().splitlines()
    assert calls[-2:] == ["srun: SIGTERM", "scontrol requeue 42"], calls


def test_sbatch_without_signal_exits_with_the_runs_code_and_no_requeue(tmp_path):
    env = slurm_env(tmp_path, SRUN_RC="3")  # srun ends by itself, with the run's exit code
    (tmp_path / "bin" / "srun").write_text('#!/usr/bin/env bash\necho "srun $*" >> "$STUB_LOG"\nexit "$SRUN_RC"\n')
    proc = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 3
    assert "requeue" not in (tmp_path / "log").read_text()
