"""Run pretrain_omni.py as users do (plain python, or torchrun with gloo) and read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "tiny_dense.yaml")


def train(output_dir: Path, nproc: int = 1, *overrides: str, config: str = TINY, timeout: int = 300,
          expect_rc: int = 0) -> list[dict]:
    """Train and return the metrics.jsonl records; fails with the process output on error."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "pretrain_omni.py")]
    else:  # --standalone picks a free localhost port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "pretrain_omni.py")]
    cmd += ["--config", config, f"--train.output_dir={output_dir}", "--train.progress_bar=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    metrics = Path(output_dir) / "metrics.jsonl"
    if expect_rc != 0:
        return [{"stderr": proc.stderr}]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b), (a, b)
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= rel, f"relative difference {worst:.2e} > {rel:.0e}\n{a}\n{b}"


def first_gradients(tmp_path: Path, nproc: int, *overrides: str, config: str = TINY, with_losses: bool = False):
    """Every parameter's full gradient after the first forward/backward (tests/grad_worker.py);
    with_losses: (gradients, {loss name: the global batch's mean loss})."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"grads_{nproc}.pt"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "tests" / "grad_worker.py"), str(out), "--config", config,
           f"--train.output_dir={tmp_path}", "--checkpoint.enabled=false", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    import torch

    grads = torch.load(out)
    return (grads, torch.load(f"{out}.losses")) if with_losses else grads


def assert_gradients_close(got: dict, ref: dict, rel: float) -> None:
    assert got.keys() == ref.keys() and len(ref) > 3, (sorted(got)[:5], sorted(ref)[:5])
    for name in ref:
        err = ((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
        assert err <= rel, f"{name}: relative gradient error {err:.2e} > {rel:.0e}"


def tool(name: str):
    """A script under tools/ imported as a module (its `main(argv)` returns the exit code)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
