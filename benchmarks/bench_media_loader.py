"""Media-conversation loader benchmark: batches with images, clips and videos decoded, built in
the training process or by 1 and 2 background workers, against what training consumes.

For `--config` (default examples/configs/sft_omni.yaml, on the files of
`python -m omni_datasets.omni_digits.conversations --out data/sft_omni`):

- loader: `build_train_data(cfg)` (in-process, num_workers=0) or `BackgroundData` with 1 and 2
  spawned workers, asked for steps 0..`--steps`-1 in order, as the trainer asks; reports start-up
  (build, or until every worker is ready), then samples/s, real (non-padding) tokens/s, and
  images / video / clips per second over the steps. With workers the time is what the training
  process waits for each step: with nothing else to do it measures the workers' throughput.
- training: `pretrain_omni.py` on the same config in a subprocess for `--train-steps` steps with
  data.num_workers=0, 1, 2: median `tokens_per_s` of metrics.jsonl after the first step and the
  wall time, so the cost of decoding inside the step and what workers win back both show.

    python -m benchmarks.bench_media_loader                      # writes docs/bench_media_loader.json
    python -m benchmarks.bench_media_loader --steps 10 --train-steps 10 --out /tmp/b.json   # quick
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, command, fmt, machine, save_report, table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "examples/configs/sft_omni.yaml"))
    p.add_argument("--steps", type=int, default=40, help="loader steps timed per worker count")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "docs/bench_media_loader.json"))
    return p.parse_args(argv)


def counts(batches) -> dict[str, int]:
    """Samples, real tokens and media items of one step's micro-batches."""
    out = {"samples": 0, "tokens": 0, "images_or_videos": 0, "clips": 0}
    for b in batches:
        pos = b.position_ids if b.position_ids.ndim == 2 else b.position_ids[0]
        out["samples"] += int(((pos[:, :-1] == 0) & (pos[:, 1:] == 1)).sum())  # a sample starts 0, 1, ...
        out["tokens"] += b.input_ids.numel() - int(b.padding_tokens or 0)
        vision = b.payloads.get("vision")
        out["images_or_videos"] += 0 if vision is None else int(vision["grid_thw"].shape[0])
        audio = b.payloads.get("audio")
        out["clips"] += 0 if audio is None else int(audio["feature_lens"].shape[0])
    return out


def loader(cfg, workers: int, steps: int) -> dict:
    from engine.data import build_train_data
    from engine.data.workers import BackgroundData

    d = cfg.data
    g, mb = d.global_batch_size, d.micro_batch_size or d.global_batch_size
    t0 = time.perf_counter()
    if workers == 0:
        source = build_train_data(cfg)
    else:
        source = BackgroundData(functools.partial(build_train_data, cfg), workers, g, 0, 1, mb)
        source.wait_ready()
    startup = time.perf_counter() - t0
    total = {"samples": 0, "tokens": 0, "images_or_videos": 0, "clips": 0}
    waits = []
    t0 = time.perf_counter()
    for step in range(steps):
        s = time.perf_counter()
        batches = source.micro_batches(step, g, 0, 1, mb)
        waits.append(time.perf_counter() - s)
        for k, v in counts(batches).items():
            total[k] += v
    seconds = time.perf_counter() - t0
    if workers:
        source.close()
    return {"workers": workers, "startup_s": round(startup, 2), "steps": steps, "seconds": round(seconds, 3),
            "median_step_ms": round(1000 * statistics.median(waits), 2), "steps_per_s": round(steps / seconds, 2),
            **{f"{k}_per_s": round(v / seconds, 1) for k, v in total.items()}, "totals": total}


def training(config: str, workers: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"train_w{workers}"
    cmd = [sys.executable, str(ROOT / "pretrain_omni.py"), "--config", config, f"--train.steps={steps}",
           f"--data.num_workers={workers}", f"--train.output_dir={out}", "--checkpoint.interval=0",
           "--checkpoint.enabled=false", "--train.eval_interval=0", "--train.tensorboard=false"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"training with {workers} workers failed:\n{run.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rec = [r for r in records if "tokens_per_s" in r][1:]
    step_s = statistics.median(r["step_time_s"] for r in steps_rec)
    return {"workers": workers, "steps": steps, "wall_s": round(wall, 1),
            "median_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steps_rec), 1),
            "median_step_s": round(step_s, 4), "steps_per_s": round(1 / step_s, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    from engine.checkpoint.weights import compose_from_init_from
    from engine.config import load_config

    try:
        cfg = compose_from_init_from(load_config(args.config, []))
        paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path] if cfg.data.path else []
        missing = [p for p in paths if not glob.glob(str(p))]
        if missing:
            raise ValueError(f"data.path={missing[0]} does not exist: make the example's files with "
                             "`python -m omni_datasets.omni_digits.conversations --out data/sft_omni`")
        if args.train_steps < 2 or args.steps < 1:
            raise ValueError("--train-steps must be >= 2 (the first step is left out) and --steps >= 1")
    except ValueError as e:  # ConfigError, a bad init_from folder, missing files: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"command": command("bench_media_loader", argv), "config": args.config, "machine": machine(), "loader": [], "training": []}
    for w in args.workers:
        report["loader"].append(loader(cfg, w, args.steps))
        save_report(report, Path(args.out))
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            report["training"].append(training(args.config, w, args.train_steps, Path(tmp)))
            save_report(report, Path(args.out))
    consumed = report["training"][0]["steps_per_s"]  # what the step needs, with decoding done in it
    for row in report["loader"]:
        row["loader_over_training"] = round(row["steps_per_s"] / consumed, 2)
    save_report(report, Path(args.out))
    print(table(["workers", "start-up s", "ms / step", "samples/s", "tokens/s", "images+videos/s", "clips/s",
                 "loader / training"],
                [[r["workers"], r["startup_s"], r["median_step_ms"], fmt(r["samples_per_s"]), fmt(r["tokens_per_s"]),
                  fmt(r["images_or_videos_per_s"]), fmt(r["clips_per_s"]), r["loader_over_training"]]
                 for r in report["loader"]], "rrrrrrrr"))
    print()
    print(table(["data.num_workers", "step s (median)", "steps/s", "tokens/s (median)", "wall s"],
                [[r["workers"], r["median_step_s"], r["steps_per_s"], fmt(r["median_tokens_per_s"]), r["wall_s"]]
                 for r in report["training"]], "rrrrr"))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
