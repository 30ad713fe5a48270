"""Ulysses sequence parallelism benchmarks: all-to-all bytes per layer, and sequence scaling.

1. Communication volume. For sp 2 and 4, sync and async, one rank's bytes in op
   "all_to_all" on axis "sp" of `engine.comm.STATS` are read after the forward and, after a
   reset, after the backward of the engine's model (built by `Trainer`, FSDP2 over the SP
   ranks, gloo), divided by the number of layers, and compared with
   `engine.parallel.ulysses.ulysses_bytes_per_layer` (goal: ratio 1.00). FSDP's own
   collectives do not go through engine.comm and are not counted; the per-(op, axis)
   counters of every run are kept in the JSON to show it.
2. Sequence scaling. The longest sequence (multiple of --step) whose one
   `Trainer.forward_backward()` keeps the per-rank peak of live tensor bytes
   (`benchmarks/live_bytes.py`, a TorchDispatchMode tracker) within --budget-mib, at sp 1, 2, 4.
   The search runs in one process per sp: plain for sp 1, and for sp > 1 as rank 0 of the
   engine's `fake` backend (torch's FakeProcessGroup: same shapes and allocations, no
   traffic), so that a probe over the budget stops at once. The lengths found are then
   re-run for real under torch.distributed.run with gloo on every rank (--no-verify skips).
   The peak is split into tensors shaped [..., S, S] (attention masks) and the rest. A
   what-if probe runs a causal-only SDPA kernel (no S x S mask: the memory behaviour of
   flash-attn varlen, NOT the same math for packed rows) at sp x the sp-1 length.
3. Step time, sync vs async Ulysses, sp 2 on CPU/gloo (--time-seq; 0 skips).

    python -m benchmarks.bench_sp                      # writes docs/bench_sp.json
    python -m benchmarks.bench_sp --budget-mib 2048 --out /tmp/bench_sp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, command, machine, save_report, table

WORKER = "benchmarks.bench_sp_worker"
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (scaling benchmark)")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--attention", default="auto", help="model.attention_backend (auto = sdpa_doc on CPU: no S x S "
                   "mask; sdpa = one call with a boolean document mask)")
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--intermediate", type=int, default=688)
    m.add_argument("--vocab", type=int, default=2048)
    c = p.add_argument_group("communication benchmark")
    c.add_argument("--comm-seq", type=int, default=1024)
    c.add_argument("--comm-layers", type=int, default=2)
    c.add_argument("--comm-kv-heads", type=int, nargs="+", default=[4, 2, 1],
                   help="fp32 cases (with --heads query heads); a bf16 case uses the first")
    s = p.add_argument_group("scaling benchmark")
    s.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--budget-mib", type=float, default=1024.0, help="per-rank budget of live tensor bytes")
    s.add_argument("--step", type=int, default=256, help="sequence lengths searched are multiples of this")
    s.add_argument("--start", type=int, default=2048,
                   help="first probe at sp 1 (sp > 1 start where the sp-1 peak's split predicts)")
    s.add_argument("--max-seq", type=int, default=131072)
    s.add_argument("--no-verify", action="store_true", help="skip the real gloo re-run of the lengths found")
    s.add_argument("--no-whatif", action="store_true", help="skip the causal-only what-if probes")
    t = p.add_argument_group("step time")
    t.add_argument("--time-seq", type=int, default=2048, help="sp-2 sync vs async step time at this length; 0 skips")
    t.add_argument("--time-steps", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["comm", "scaling", "time"])
    p.add_argument("--timeout", type=int, default=600, help="per subprocess, seconds")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_sp.json"))
    return p.parse_args(argv)


# -------------------------------------------------------------------------------- plumbing


def launch(mode: str, nproc: int, args: dict, timeout: int, distributed: bool, ok_codes=(0,)) -> list[dict]:
    """Run the worker (under torch.distributed.run when `distributed`); return its BENCH_SP records."""
    with tempfile.TemporaryDirectory(prefix="bench_sp_") as results:
        payload = json.dumps({**args, "results_dir": results})
        cmd = [sys.executable, "-m", WORKER, mode, payload]
        if distributed:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", WORKER, mode, payload]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.get("threads", 1)), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        records = [json.loads(line) for f in sorted(Path(results).glob("rank*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip()]
    if proc.returncode not in ok_codes and not (records and all(not r.get("fits", True) for r in records
                                                                if r["mode"] == "mem")):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"{mode} worker (nproc={nproc}) failed with exit code {proc.returncode}")
    return records


def model_args(a: argparse.Namespace) -> dict:
    return {"vocab": a.vocab, "hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers,
            "heads": a.heads, "kv_heads": a.kv_heads, "batch": 1, "attention": a.attention}


# -------------------------------------------------------------------------------- benchmarks


def bench_comm(a: argparse.Namespace) -> list[dict]:
    from engine.parallel.ulysses import ulysses_bytes_per_layer

    cases = [{"name": f"kv{kv}", "kv_heads": kv} for kv in a.comm_kv_heads]
    cases.append({"name": f"kv{a.comm_kv_heads[0]}-bf16", "kv_heads": a.comm_kv_heads[0], "dtype": "bf16"})
    rows = []
    for sp in (2, 4):
        args = {**model_args(a), "layers": a.comm_layers, "seq": a.comm_seq, "threads": 1,
                "cases": [c for c in cases if a.heads % sp == 0 and (c["kv_heads"] % sp == 0 or sp % c["kv_heads"] == 0)]}
        recs = launch("comm", sp, args, a.timeout, distributed=True)
        for r in (r for r in recs if r["rank"] == 0):
            peers = [p for p in recs if (p["case"], p["sp_async"]) == (r["case"], r["sp_async"])]
            elem = 2 if r["act_dtype"] == "torch.bfloat16" else 4
            analytic = ulysses_bytes_per_layer(r["batch"], r["seq"], r["heads"], r["kv_heads"], r["head_dim"], sp, elem)
            fwd, bwd = r["fwd_bytes"] / r["layers"], r["bwd_bytes"] / r["layers"]
            rows.append({
                "sp": sp, "mode": "async" if r["sp_async"] else "sync", "heads": r["heads"], "kv_heads": r["kv_heads"],
                "head_dim": r["head_dim"], "seq": r["seq"], "batch": r["batch"], "act_dtype": r["act_dtype"][6:],
                "fwd_bytes_per_layer": fwd, "bwd_bytes_per_layer": bwd, "analytic_bytes_per_layer": analytic,
                "fwd_ratio": fwd / analytic, "bwd_ratio": bwd / analytic,
                "calls_per_layer_fwd": r["fwd_calls"] / r["layers"], "calls_per_layer_bwd": r["bwd_calls"] / r["layers"],
                "ranks_agree": all((p["fwd_bytes"], p["bwd_bytes"]) == (r["fwd_bytes"], r["bwd_bytes"]) for p in peers),
                "all_counters_fwd": r["fwd_stats"], "all_counters_bwd": r["bwd_stats"]})
    return rows


def bench_scaling(a: argparse.Namespace) -> dict:
    budget = int(a.budget_mib * MIB)
    base = {**model_args(a), "budget": budget, "step": a.step, "max_seq": a.max_seq, "top": 8, "threads": os.cpu_count()}
    results, l1 = {}, None
    for sp in sorted(a.sp):
        start = a.start
        if l1 is not None:  # predicted from the sp-1 peak: S x S part unchanged, the rest / sp
            r1 = results[min(results)]
            rest = (r1["peak_bytes"] - r1["square_bytes_at_peak"] - r1["baseline_bytes"]) / l1 / sp
            q = r1["square_bytes_at_peak"] / l1**2
            room = budget - r1["baseline_bytes"] / sp
            start = int((-rest + (rest * rest + 4 * q * room) ** 0.5) / (2 * q)) if q else sp * l1
            start = max(l1, start - a.step)  # one step under the prediction: a first probe that fits
        args = {**base, "sp": sp, "start": start, "floor": l1 or 0}
        if sp > 1:
            args.update(backend="fake", fake_world=sp)
        if not a.no_whatif and l1 is not None:
            args["whatif"] = [sp * l1]
        t0 = time.perf_counter()
        recs = launch("search", 1, args, a.timeout, distributed=False)
        search = next(r for r in recs if r["mode"] == "search")
        if sp == 1:
            l1 = search["longest"]
        probes = [r for r in recs if r["mode"] == "probe"]
        best = next(p for p in probes if p["seq"] == search["longest"])
        failing = next((p for p in probes if p["seq"] == search["first_failing"]), None)
        results[sp] = {"sp": sp, "longest_seq": search["longest"], "first_failing_seq": search["first_failing"],
                       "peak_bytes": best["peak"], "square_bytes_at_peak": best["square_bytes_at_peak"],
                       "peak_at": best["peak_at"], "breakdown": best["breakdown"], "baseline_bytes": best["baseline"],
                       "failing_peak_bytes_at_stop": failing and failing["peak"], "probes": probes,
                       "whatif": [r for r in recs if r["mode"] == "whatif"], "search_seconds": time.perf_counter() - t0,
                       "search_backend": "none (one process)" if sp == 1 else f"fake (rank 0 of {sp})"}
        results[sp]["scaling"] = search["longest"] / l1 if l1 else None
    if not a.no_verify:
        for sp in (s for s in sorted(a.sp) if s > 1):
            r = results[sp]
            recs = launch("mem", sp, {**base, "seq": r["longest_seq"], "threads": 1, "top": 3}, a.timeout,
                          distributed=True, ok_codes=(0, 1))
            r["verify_gloo"] = {"seq": r["longest_seq"], "fits_all_ranks": all(x["fits"] for x in recs),
                                "peak_bytes_per_rank": [x["peak"] for x in sorted(recs, key=lambda x: x["rank"])],
                                # a few bytes of scalars may differ (the search process ran earlier probes)
                                "matches_fake": all(abs(x["peak"] - r["peak_bytes"]) < 2**16 for x in recs)}
    return {"budget_bytes": budget, "step": a.step, "model": model_args(a), "per_sp": results}


def bench_time(a: argparse.Namespace) -> list[dict]:
    args = {**model_args(a), "seq": a.time_seq, "threads": 1, "warmup": 1, "steps": a.time_steps}
    recs = launch("time", 2, args, a.timeout, distributed=True)
    rows = []
    for mode in (False, True):
        per_rank = [r["median_s"] for r in recs if r["sp_async"] == mode]
        rows.append({"sp": 2, "seq": a.time_seq, "mode": "async" if mode else "sync", "median_step_s": max(per_rank),
                     "steps": a.time_steps, "device": "cpu/gloo"})
    return rows


# -------------------------------------------------------------------------------- report


def comm_table(rows: list[dict]) -> str:
    return table(["sp", "mode", "heads/kv", "dtype", "fwd B/layer", "bwd B/layer", "analytic B/layer", "fwd ratio",
                  "bwd ratio", "a2a calls/layer"],
                 [[r["sp"], r["mode"], f"{r['heads']}/{r['kv_heads']}", r["act_dtype"], int(r["fwd_bytes_per_layer"]),
                   int(r["bwd_bytes_per_layer"]), r["analytic_bytes_per_layer"], f"{r['fwd_ratio']:.2f}",
                   f"{r['bwd_ratio']:.2f}", f"{r['calls_per_layer_fwd']:g}+{r['calls_per_layer_bwd']:g}"] for r in rows])


def scaling_table(sc: dict) -> str:
    rows = []
    for sp, r in sorted(sc["per_sp"].items()):
        v = r.get("verify_gloo")
        w = r["whatif"][0] if r["whatif"] else None
        rows.append([sp, r["longest_seq"], f"{r['scaling']:.2f}x", f"{r['peak_bytes'] / MIB:.0f}",
                     f"{r['square_bytes_at_peak'] / MIB:.0f}",
                     f"{(r['peak_bytes'] - r['square_bytes_at_peak']) / MIB:.0f}", r["first_failing_seq"],
                     "-" if v is None else ("same, all ranks fit" if v["matches_fake"] and v["fits_all_ranks"]
                                            else f"peaks {[round(p / MIB) for p in v['peak_bytes_per_rank']]} MiB"),
                     "-" if w is None else f"{w['seq']}: {w['peak'] / MIB:.0f} MiB{'' if w['fits'] else ' (over)'}"])
    return table(["sp", "longest seq", "vs sp1", "peak MiB/rank", "S x S tensors MiB", "rest MiB", "first failing",
                  "real gloo re-run", "what-if causal-only kernel at sp x L1"], rows)


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    out = {"machine": machine(gpu_note="sync vs async step time on GPU: not measured"),
           "command": command("bench_sp", argv)}
    if "comm" not in a.skip:
        out["comm"] = bench_comm(a)
        print(f"\nUlysses all-to-all bytes sent by one rank per attention layer (seq {a.comm_seq}, batch 1)")
        print(comm_table(out["comm"]))
    if "scaling" not in a.skip:
        out["scaling"] = bench_scaling(a)
        print(f"\nLongest sequence with one fwd+bwd step within {a.budget_mib:g} MiB of live tensor bytes per rank "
              f"(hidden {a.hidden}, {a.heads} heads, {a.kv_heads} kv, {a.layers} layers, batch 1, fp32, SDPA)")
        print(scaling_table(out["scaling"]))
        top = max(out["scaling"]["per_sp"].values(), key=lambda r: r["sp"])
        print(f"\nlargest tensors live at the peak, sp {top['sp']} seq {top['longest_seq']} (peak reached at: "
              f"{top['peak_at']}):")
        for b in top["breakdown"][:6]:
            print(f"  {b['bytes'] / MIB:8.1f} MiB  {b['count']:3d} x {b['tensor']}")
    if "time" not in a.skip and a.time_seq:
        out["time"] = bench_time(a)
        print(f"\nStep time (Trainer.train_step, median of {a.time_steps}), sp 2, seq {a.time_seq}, CPU/gloo; "
              "GPU: not measured (no GPU in this session)")
        print(table(["mode", "median step s"], [[r["mode"], f"{r['median_step_s']:.3f}"] for r in out["time"]]))
    out["total_seconds"] = time.perf_counter() - t0
    save_report(out, Path(a.out))
    print(f"\nwrote {a.out} in {out['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
