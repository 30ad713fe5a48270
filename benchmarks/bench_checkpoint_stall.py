"""How long training stalls for a checkpoint: synchronous vs asynchronous DCP saves.

Trains a Llama-shaped model (examples/configs/tiny_dense.yaml widened by the options) with
`pretrain_omni.py`, in one process and under torchrun with gloo on N processes, saving every
`--interval` steps, once with `checkpoint.async_save=false` and once with `true`. From
metrics.jsonl: a step's own time (`step_time_s`, median over steps without a save) and, on a
save step, the time `fit` spent in the save (`save_s`, the stall: the whole write and
checksum when synchronous; the copy to CPU memory when asynchronous, plus any wait for the
previous save). The last step's save is left out (an asynchronous one is waited for when
training ends), and so is the first step (warm-up). `after_save_s` is the median step right
after a save: an asynchronous write runs in a background thread, which competes with
training for the CPU cores; the mean step time with saves included sums it all up.

    python -m benchmarks.bench_checkpoint_stall                 # writes docs/bench_checkpoint_stall.json
    python -m benchmarks.bench_checkpoint_stall --nproc 1 --steps 20 --out /tmp/stall.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, command, machine, save_report, table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--batch", type=int, default=8, help="data.global_batch_size (sequences of 64 tokens)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=41)
    p.add_argument("--interval", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--nproc", default="1,2", help="process counts (1: plain python; >1: torchrun, gloo)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_checkpoint_stall.json"))
    return p.parse_args(argv)


def train(args, nproc: int, async_save: bool, out: Path) -> tuple[list[dict], float]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(ROOT / "pretrain_omni.py"), "--config", str(ROOT / "examples/configs/tiny_dense.yaml"),
           f"--train.output_dir={out}", "--train.progress_bar=false", f"--train.steps={args.steps}",
           f"--model.hidden_size={args.hidden}", f"--model.num_layers={args.layers}",
           f"--model.intermediate_size={args.intermediate}", f"--model.num_heads={args.heads}",
           f"--model.num_kv_heads={args.kv_heads}", f"--data.global_batch_size={args.batch}",
           f"--checkpoint.interval={args.interval}",
           f"--checkpoint.async_save={str(async_save).lower()}", "--checkpoint.resume=none",
           "--checkpoint.keep_last=2"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], wall


def summarize(records: list[dict], interval: int, wall: float) -> dict:
    last = records[-1]["step"]
    timed = [r for r in records if 1 < r["step"] < last]
    saves = [r["save_s"] for r in timed if "save_s" in r]
    plain = [r["step_time_s"] for r in timed if "save_s" not in r]
    after = [r["step_time_s"] for r in timed if r["step"] % interval == 1 and "save_s" not in r]
    med = statistics.median
    return {"saves_timed": len(saves), "step_s": med(plain), "save_s": med(saves), "save_s_max": max(saves),
            "after_save_s": med(after) if after else None,
            "mean_step_with_saves_s": statistics.mean(r["step_time_s"] + r.get("save_s", 0.0) for r in timed),
            "wall_s": wall, "loss_last": records[-1]["loss"]}


def checkpoint_mb(out: Path) -> float:
    ckpt = max((out / "checkpoints").iterdir())
    return sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    report = {
        "machine": machine(),
        "command": command("bench_checkpoint_stall", argv),
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "intermediate_size": args.intermediate,
                  "num_heads": args.heads, "num_kv_heads": args.kv_heads}, "global_batch_size": args.batch,
        "steps": args.steps, "interval": args.interval, "runs": rows}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (int(n) for n in args.nproc.split(",")):
            for async_save in (False, True):
                out = Path(tmp) / f"n{nproc}_{'async' if async_save else 'sync'}"
                records, wall = train(args, nproc, async_save, out)
                row = {"nproc": nproc, "mode": "async" if async_save else "sync",
                       **summarize(records, args.interval, wall), "checkpoint_mb": checkpoint_mb(out)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nmodel hidden {args.hidden} x {args.layers} layers, batch {args.batch} x 64 tokens, {args.steps} steps, "
          f"a save every {args.interval}")
    head = ("procs", "mode", "ckpt MB", "step s", "save stall s (median / max)", "step after a save s",
            "mean s per step, saves included", "wall s")
    print(table(head, [[r["nproc"], r["mode"], f"{r['checkpoint_mb']:.0f}", f"{r['step_s']:.3f}",
                        f"{r['save_s']:.3f} / {r['save_s_max']:.3f}",
                        "-" if r["after_save_s"] is None else f"{r['after_save_s']:.3f}",
                        f"{r['mean_step_with_saves_s']:.3f}", f"{r['wall_s']:.1f}"] for r in rows],
                align="ll" + "r" * 6))
    for nproc in sorted({r["nproc"] for r in rows}):
        sync, asyn = (next(r for r in rows if r["nproc"] == nproc and r["mode"] == m) for m in ("sync", "async"))
        print(f"{nproc} proc: a save stalls training {sync['save_s'] / asyn['save_s']:.1f}x shorter with async_save")
    save_report(report, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
