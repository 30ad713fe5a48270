"""Where a training step makes the host wait for the GPU: the tiny dense, MoE and omni configs
train a warm-up step, then steps under `torch.cuda.set_sync_debug_mode("warn")`, and every
synchronising call is counted by the line of engine code that made it (a `.item()`, a
`.tolist()`, a `bincount`, boolean indexing, a tensor built from a Python list, ...).

The GPU check runs it (`tools/gpu_check.sh`, stage `syncs`); the JSON lists the sites by count,
the to-do list for taking syncs out of the step. On CPU (`--device cpu`) there is nothing to
count: the run only checks the script.

    python -m benchmarks.gpu_sync_audit --out OUT/syncs.json
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch

from benchmarks.common import ROOT, command, machine, save_report
from engine.comm import DistContext
from engine.config import load_config
from engine.training.trainer import Trainer

CONFIGS = ("tiny_dense", "tiny_moe", "tiny_omni")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=2, help="audited steps after one warm-up step")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--out", default="outputs/gpu_check/syncs.json")
    return p.parse_args(argv)


def audit(name: str, args, work: Path) -> dict:
    cfg = load_config(str(ROOT / "examples" / "configs" / f"{name}.yaml"), [
        ("train.device", args.device), ("train.dtype", args.dtype), ("train.output_dir", str(work / name)),
        ("train.progress_bar", "false"), ("train.tensorboard", "false"), ("checkpoint.enabled", "false"),
        ("train.steps", str(args.steps + 1))])
    trainer = Trainer(cfg, DistContext(0, 1, 0, torch.device(args.device), "none"))
    try:
        trainer.train_step()  # warm-up: kernel selection, probes, caches
        sites: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(args.steps):
                    trainer.train_step()
            finally:
                if args.device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message):
                where = Path(w.filename)
                where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
                sites[f"{where}:{w.lineno}"] += 1
    finally:
        trainer.close()
    per_step = {site: n / args.steps for site, n in sites.most_common()}
    return {"config": name, "steps": args.steps, "syncs_per_step": sum(per_step.values()), "sites": per_step}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    report = {"benchmark": "host syncs per training step", "command": command("gpu_sync_audit", argv),
              "machine": machine(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": args.dtype, "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            try:
                row = audit(name, args, Path(tmp))
            except Exception as e:  # record and go on to the next config
                row = {"config": name, "error": f"{type(e).__name__}: {e}"[:300]}
            report["configs"].append(row)
            save_report(report, out)
            print(f"{name}: {row.get('syncs_per_step', row.get('error'))} syncs per step", flush=True)
            for site, n in list(row.get("sites", {}).items())[:15]:
                print(f"  {n:6.1f}  {site}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
