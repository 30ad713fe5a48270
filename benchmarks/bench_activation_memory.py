"""Activation-memory levers: peak live tensor bytes and step time of none / selective / full
checkpointing and activation offload, on the tiny dense and omni models at a long sequence,
and the longest sequence whose training step fits a fixed tensor-byte budget for each.

Every case is built by the engine's own `Trainer` (one process, CPU) from
examples/configs/tiny_dense.yaml or tiny_omni.yaml with data.seq_len = S and one sequence per
step. Memory: `LiveBytes` (benchmarks/live_bytes.py) around one `Trainer.forward_backward()`;
the peak includes the parameters and inputs (`baseline`). Time: median wall time of
`Trainer.train_step()` (forward, backward, clipping, AdamW) after a warm-up step. "Held after
forward" is what is alive when the forward returns (the saved activations the levers act
on); the peak comes later, in the backward (the JSON's `peak_at` names the allocation), and
adds the backward's own temporaries and, with checkpointing, the recomputed block.

Offload on a CPU machine: activations already live in host memory, so `parallel.activation_offload`
changes nothing there. The benchmark measures what it would keep off the device with
`SimulatedHostOffload`: the engine's hooks with the copy path forced on, whose host copies
are made outside the tracker (they stand for pinned host memory) and whose copies back are
tracked (they stand for the device copy backward uses). Its step time is a CPU memcpy, NOT
the PCIe transfer overlapped on a side stream of a GPU run. The machine is shared (2 cores,
several jobs): times are noisy; the memory figures are exact and repeatable.

    python -m benchmarks.bench_activation_memory                      # writes docs/bench_activation_memory.json
    python -m benchmarks.bench_activation_memory --seq 2048 --budget-mib 32 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

from benchmarks.common import ROOT, command, fmt, machine, save_report, table
from benchmarks.live_bytes import LiveBytes
from engine.comm import DistContext
from engine.config import load_config
from engine.config_validation import validate
from engine.modalities import call_part
from engine.parallel.activation_memory import ActivationOffload, apply_activation_offload
from engine.training.trainer import Trainer

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")
MODELS = {"dense": "tiny_dense.yaml", "omni": "tiny_omni.yaml"}
LEVERS = {
    "none": {},
    "selective": {"parallel.activation_checkpointing": "selective"},
    "full": {"parallel.activation_checkpointing": "full"},
    "offload": {"offload": True},
    "encoders full (per part)": {"parts": "full"},  # omni only: the backbone keeps everything
}


class SimulatedHostOffload(ActivationOffload):
    """The engine's offload hooks with the copy path on, measured as a GPU run would see them:
    host copies are invisible to the tracker (host memory), copies back are tracked (device)."""

    def __init__(self):
        super().__init__(force_copy=True)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        with _disable_current_modes():
            return t.detach().clone()

    def _back_from_host(self, host: torch.Tensor) -> torch.Tensor:
        return host.clone()


def build(model: str, lever: str, seq: int, out_dir: str):
    """(trainer, the offload applied to its model or None)."""
    spec = LEVERS[lever]
    overrides = [("data.seq_len", str(seq)), ("data.global_batch_size", "1"), ("data.micro_batch_size", "0"),
                 ("model.max_position_embeddings", str(max(seq, 4096))), ("train.steps", "1000"),
                 ("train.warmup_steps", "1"), ("train.output_dir", out_dir), ("train.progress_bar", "false"),
                 ("train.tensorboard", "false"), ("checkpoint.enabled", "false"), ("checkpoint.resume", "none")]
    overrides += [(k, v) for k, v in spec.items() if "." in k]
    cfg = load_config(str(ROOT / "examples" / "configs" / MODELS[model]), overrides)
    if spec.get("parts"):
        for part in cfg.model.encoders:
            part["activation_checkpointing"] = spec["parts"]
        validate(cfg)
    trainer = Trainer(cfg, CPU)
    offload = apply_activation_offload(trainer.model, SimulatedHostOffload()) if spec.get("offload") else None
    return trainer, offload


def probe(model: str, lever: str, seq: int, out_dir: str, budget: int | None = None, steps: int = 0) -> dict:
    """Peak live bytes of one forward+backward at `seq` (stops past `budget`), then the median
    time of `steps` training steps after one warm-up step."""
    trainer, offload = build(model, lever, seq, out_dir)
    gc.collect()
    mem = LiveBytes(budget=budget)
    held = []  # bytes alive when the forward returns: what the backward will read
    forward = trainer.model.loss_sums

    def loss_sums(*args, **kwargs):
        out = forward(*args, **kwargs)
        gc.collect()  # garbage in reference cycles is not what the backward reads
        held.append(mem.current - mem.baseline)
        return out

    trainer.model.loss_sums = loss_sums
    try:
        with mem:
            trainer.forward_backward()
    except Exception:  # noqa: BLE001 - BudgetExceeded, possibly wrapped by autograd
        if not mem.exceeded:
            raise
    record = {"seq": seq, "fits": not mem.exceeded, "peak": mem.peak, "baseline": mem.baseline,
              "activations": mem.peak - mem.baseline, "held_after_forward": max(held, default=None),
              "peak_at": mem.peak_tag}
    if offload is not None:
        record["offloaded_bytes"] = offload.bytes
    if steps and not mem.exceeded:
        trainer.optimizer.zero_grad(set_to_none=True)
        times = [trainer.train_step()["step_time_s"] for _ in range(steps + 1)][1:]
        record.update(step_time_s=statistics.median(times), step_times_s=times)
    trainer.close()
    del trainer, mem
    gc.collect()
    return record


def longest(model: str, lever: str, budget: int, step: int, max_seq: int, hint: dict, out_dir: str) -> dict:
    """Longest multiple of `step` (<= max_seq) whose forward+backward peak fits `budget`: start
    at the length predicted from `hint` (a probe; peaks grow linearly here: no S x S tensor),
    then walk up or down one step at a time until the boundary is bracketed."""
    per_token = max(hint["peak"] - hint["baseline"], 1) / hint["seq"]
    seq = max(step, min(max_seq, int((budget - hint["baseline"]) / per_token) // step * step))
    lo, hi, probes = 0, max_seq + step, []
    while hi - lo > step and len(probes) < 10:
        rec = probe(model, lever, seq, out_dir, budget)
        probes.append({k: rec[k] for k in ("seq", "fits", "peak")})
        if rec["fits"]:
            lo = seq
            seq = seq + step
        else:
            hi = seq
            seq = seq - step
        if seq <= lo or seq >= hi:
            break
    return {"longest": lo, "first_failing": hi if hi <= max_seq else None, "probes": probes}


def vision_probe(mode: str, frames: int, side: int, depth: int, out_dir: str, steps: int) -> dict:
    """tiny_omni's vision part (depth raised to `depth`) with its own activation_checkpointing
    `mode`, on one video of `frames` x `side` x `side` patches: the bytes alive after its
    forward, the peak of forward + backward, and the median forward + backward time."""
    cfg = load_config(str(ROOT / "examples" / "configs" / MODELS["omni"]),
                      [("train.output_dir", out_dir), ("train.progress_bar", "false"), ("checkpoint.enabled", "false")])
    cfg.model.encoders[0].update(depth=depth, activation_checkpointing=mode)
    validate(cfg)
    trainer = Trainer(cfg, CPU)
    vision = trainer.model.encoders["vision"]
    gen = torch.Generator().manual_seed(0)
    payload = {"pixel_values": torch.randn(frames * side * side, vision.patch_dim, generator=gen),
               "grid_thw": torch.tensor([[frames, side, side]])}

    def step():
        call_part(vision, "lm_encode", payload).pow(2).mean().backward()

    gc.collect()
    with LiveBytes() as mem:
        out = call_part(vision, "lm_encode", payload)
        gc.collect()
        held = mem.current - mem.baseline
        out.pow(2).mean().backward()
        del out
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    record = {"mode": mode, "patches": frames * side * side, "depth": depth, "held_after_forward": held,
              "peak": mem.peak - mem.baseline, "time_s": statistics.median(times[1:]), "times_s": times[1:]}
    trainer.close()
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seq", type=int, default=8192, help="sequence length of the peak and time columns")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="tensor-byte budget of the longest-sequence search")
    p.add_argument("--search-step", type=int, default=512)
    p.add_argument("--max-seq", type=int, default=32768)
    p.add_argument("--vision", type=int, nargs=3, default=[4, 32, 4], metavar=("FRAMES", "SIDE", "DEPTH"),
                   help="the vision-tower case: one video of FRAMES x SIDE x SIDE patches, DEPTH blocks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_activation_memory.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="bench_act_mem_")
    budget = int(args.budget_mib * 2**20)
    report = {"command": command("bench_activation_memory", argv), "machine": machine(), "args": vars(args),
              "results": {}}
    rows = []
    t_start = time.perf_counter()
    try:
        for model in args.models:
            for lever in LEVERS:
                if LEVERS[lever].get("parts") and model != "omni":
                    continue
                rec = probe(model, lever, args.seq, out_dir, steps=args.steps)
                rec["search"] = longest(model, lever, budget, args.search_step, args.max_seq, rec, out_dir)
                report["results"].setdefault(model, {})[lever] = rec
                rows.append([model, lever, fmt(rec["peak"] / 2**20, 1), fmt(rec["held_after_forward"] / 2**20, 1),
                             f"{rec['step_time_s']:.2f}", fmt(rec["search"]["longest"])])
                print(" | ".join(rows[-1]), flush=True)
        vision_rows = []
        for mode in ("none", "selective", "full"):
            rec = vision_probe(mode, *args.vision, out_dir, args.steps)
            report.setdefault("vision_part", {})[mode] = rec
            vision_rows.append([mode, fmt(rec["patches"]), fmt(rec["held_after_forward"] / 2**20, 1),
                                fmt(rec["peak"] / 2**20, 1), f"{rec['time_s']:.3f}"])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - t_start
    header = ["model", "lever", f"peak MiB @ {args.seq}", "held after forward MiB", "step s",
              f"longest seq in {args.budget_mib:g} MiB"]
    print(table(header, rows, align="llrrrr"))
    print(table(["encoders[0].activation_checkpointing", "patches", "held after forward MiB", "peak MiB",
                 "fwd+bwd s"], vision_rows, align="lrrrr", title=f"vision part alone, depth {args.vision[2]}, one "
                f"video of {args.vision[0]} x {args.vision[1]} x {args.vision[1]} patches"))
    save_report(report, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
