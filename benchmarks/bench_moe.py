"""Mixture-of-experts benchmarks: EP dispatch volume, plain vs overlapped dispatcher, grouped GEMM.

1. Dispatch volume. One forward and one backward of an engine `MoE` layer under
   torch.distributed.run (gloo) with ep 2 and 4, plain and overlapped dispatchers. The bytes
   one rank sends in op "all_to_all" on axis "ep" of `engine.comm.STATS` are read after the
   forward and (after a reset) after the backward. The per-expert count exchange also counts
   there; it is measured on its own (STATS before/after `_exchange_counts`) and reported
   separately. The analytic figure comes from the actual routing: a rank sends its token
   copies whose expert lives on another rank (dispatch) and returns the copies other ranks
   sent to its experts (combine); the backward sends the same rows the other way, so per rank
   fwd = bwd = (remote copies sent + remote copies received) x hidden x bytes per element.
   Goal: measured / analytic = 1.00 for every rank.
2. Step time of the MoE layer (forward + backward, max over ranks, median of --steps after
   --warmup), plain vs overlapped dispatcher, world 2 and 4, gloo on CPU.
3. Grouped GEMM (`torch._grouped_mm`, the engine's path where the build supports it) vs the
   engine's per-expert loop fallback, `expert_ffn` forward + backward, one process. With
   --device cuda it runs on a GPU (not run in the CPU session that wrote docs/bench_moe.json).

    python -m benchmarks.bench_moe                          # all three, writes docs/bench_moe.json
    python -m benchmarks.bench_moe --skip time --out /tmp/bench_moe.json
    python -m benchmarks.bench_moe --only gemm --device cuda --out /tmp/bench_moe_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, command, machine, save_report, table

TAG = "BENCH_MOE "
PARTS = ("volume", "time", "gemm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("MoE layer")
    m.add_argument("--hidden", type=int, default=128)
    m.add_argument("--moe-intermediate", type=int, default=256)
    m.add_argument("--experts", type=int, default=16)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--seq", type=int, default=256)
    m.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--chunks", type=int, default=2, help="chunks of the overlapped dispatcher")
    p.add_argument("--volume-dtypes", nargs="+", default=["float32", "bfloat16"])
    t = p.add_argument_group("step time")
    t.add_argument("--steps", type=int, default=15)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--repeats", type=int, default=3, help="independent launches per case; the median is reported")
    t.add_argument("--time-hidden", type=int, nargs="+", default=[128, 512],
                   help="hidden sizes timed (moe intermediate = 2 x hidden)")
    g = p.add_argument_group("grouped GEMM")
    g.add_argument("--gemm-shapes", nargs="+", default=["128x256", "512x1024"], help="HIDDENxINTERMEDIATE")
    g.add_argument("--gemm-tokens", type=int, default=1024)
    g.add_argument("--gemm-dtypes", nargs="+", default=["float32", "bfloat16"])
    g.add_argument("--gemm-reps", type=int, default=20)
    g.add_argument("--threads", type=int, default=1, help="torch threads for the GEMM benchmark and workers")
    g.add_argument("--device", default="cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    p.add_argument("--only", nargs="*", default=[], choices=PARTS)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_moe.json"))
    p.add_argument("--worker", choices=["volume", "time"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the layer
def build_layer(args, hidden: int, intermediate: int, dtype):
    """An engine MoE layer with seeded weights identical on every rank (all experts, before EP)."""
    import torch

    from engine.config import ModelConfig
    from engine.models.moe import MoE

    cfg = ModelConfig(backbone="moe", hidden_size=hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_intermediate_size=intermediate, norm_topk_prob=True, router_aux_loss_coef=0.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
        moe.gate.weight.normal_(0.0, 0.5)  # a router with preferences: uneven expert loads, like real ones
    return moe.to(dtype).eval()


def shard(moe, ep_mesh, num_experts: int, chunks: int) -> None:
    """Apply the engine's EP to the layer and keep this rank's rows of the seeded experts."""
    import torch

    from engine.parallel.expert_parallel import apply_expert_parallel

    full = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    apply_expert_parallel({"moe": moe}, ep_mesh, num_experts, chunks)
    with torch.no_grad():
        for n, p in moe.experts.named_parameters():
            first = moe.experts.global_rows[n][1]
            p.data = full[n][first:first + p.shape[0]].clone()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from engine.comm import STATS, init_distributed, shutdown
    from engine.parallel import expert_parallel
    from engine.parallel.expert_parallel import build_ep_meshes

    torch.set_num_threads(args.threads)
    ctx = init_distributed("gloo", "cpu")
    rank, ep = ctx.rank, ctx.world_size
    dtype = getattr(torch, args.dtype)
    hidden, inter = args.hidden, args.moe_intermediate
    ep_mesh = build_ep_meshes("cpu", 1, ep, ep)[0]
    key = ("all_to_all", "ep")
    count_bytes = [0]
    original = expert_parallel.AllToAllDispatcher._exchange_counts

    def counted(self, counts):  # the count exchange's bytes, kept apart from the token rows'
        before = STATS.bytes[key]
        out = original(self, counts)
        count_bytes[0] += STATS.bytes[key] - before
        return out
    expert_parallel.AllToAllDispatcher._exchange_counts = counted

    records = []
    if args.worker == "volume":
        for chunks in (1, args.chunks):
            moe = build_layer(args, hidden, inter, dtype)
            shard(moe, ep_mesh, args.experts, chunks)
            gen = torch.Generator().manual_seed(1000 + rank)
            x = torch.randn(args.batch, args.seq, hidden, generator=gen).to(dtype).requires_grad_()
            STATS.reset()
            count_bytes[0] = 0
            y = moe(x)
            fwd, fwd_counts = STATS.bytes[key] - count_bytes[0], count_bytes[0]
            STATS.reset()
            count_bytes[0] = 0
            y.backward(torch.randn(y.shape, generator=gen).to(dtype))
            bwd, bwd_counts = STATS.bytes[key] - count_bytes[0], count_bytes[0]
            # the routing actually used, and where each copy's expert lives
            with torch.no_grad():
                idx = moe.route(x.detach().reshape(-1, hidden))[2]
            local = args.experts // ep
            send = torch.bincount((idx // local).flatten(), minlength=ep)  # copies for each rank
            table = torch.empty(ep * ep, dtype=send.dtype)
            dist.all_gather_into_tensor(table, send)  # raw torch.distributed: not counted in STATS
            table = table.view(ep, ep)  # [source rank, destination rank]
            remote_out = int(table[rank].sum() - table[rank, rank])
            remote_in = int(table[:, rank].sum() - table[rank, rank])
            row = hidden * x.element_size()
            analytic = (remote_out + remote_in) * row
            mine = dict(rank=rank, ep=ep, chunks=chunks, dtype=args.dtype, tokens=x.shape[0] * x.shape[1],
                        copies=int(idx.numel()), remote_out=remote_out, remote_in=remote_in,
                        fwd_bytes=fwd, bwd_bytes=bwd, count_bytes_fwd=fwd_counts, count_bytes_bwd=bwd_counts,
                        analytic_fwd=analytic, analytic_bwd=analytic,
                        analytic_dispatch_fwd=remote_out * row, analytic_combine_fwd=remote_in * row)
            gathered = [None] * ep
            dist.all_gather_object(gathered, mine)
            records.append({"case": "volume", "ranks": gathered})
            del moe, x, y
    else:
        for hidden in args.time_hidden:
            for chunks in (1, args.chunks):
                moe = build_layer(args, hidden, 2 * hidden, dtype)
                shard(moe, ep_mesh, args.experts, chunks)
                gen = torch.Generator().manual_seed(1000 + rank)
                x = torch.randn(args.batch, args.seq, hidden, generator=gen).to(dtype).requires_grad_()
                grad = torch.randn(x.shape, generator=gen).to(dtype)
                times = []
                for step in range(args.warmup + args.steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    moe(x).backward(grad)
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
                    if step >= args.warmup:
                        times.append(dt.item())
                    x.grad = None
                    moe.zero_grad(set_to_none=True)
                records.append({"case": "time", "ep": ep, "hidden": hidden, "intermediate": 2 * hidden,
                                "chunks": chunks, "median_ms": 1e3 * statistics.median(times),
                                "min_ms": 1e3 * min(times), "steps": len(times)})
                del moe, x
    if rank == 0:
        for r in records:
            print(TAG + json.dumps(r), flush=True)
    import gc
    gc.collect()
    shutdown()


# ------------------------------------------------------------------------------ plumbing
def launch(args, mode: str, nproc: int, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "benchmarks.bench_moe", "--worker", mode, "--hidden", str(args.hidden),
           "--moe-intermediate", str(args.moe_intermediate), "--experts", str(args.experts),
           "--top-k", str(args.top_k), "--seq", str(args.seq), "--batch", str(args.batch),
           "--chunks", str(args.chunks), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--time-hidden", *map(str, args.time_hidden), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(line[len(TAG):]) for line in proc.stdout.splitlines() if line.startswith(TAG)]


def bench_volume(args) -> tuple[list[dict], str]:
    results, rows = [], []
    for ep in args.ep:
        if args.experts % ep:
            continue
        for dtype in args.volume_dtypes:
            for rec in launch(args, "volume", ep, ["--dtype", dtype]):
                for r in rec["ranks"]:
                    r["ratio_fwd"] = r["fwd_bytes"] / r["analytic_fwd"] if r["analytic_fwd"] else None
                    r["ratio_bwd"] = r["bwd_bytes"] / r["analytic_bwd"] if r["analytic_bwd"] else None
                results.append(rec)
                r0 = rec["ranks"][0]
                worst = max(abs(r[k] - 1) for r in rec["ranks"] for k in ("ratio_fwd", "ratio_bwd"))
                rows.append([ep, "overlap" if r0["chunks"] > 1 else "plain", dtype, r0["copies"],
                             f"{r0['remote_out']}/{r0['remote_in']}", r0["fwd_bytes"], r0["analytic_fwd"],
                             r0["bwd_bytes"], r0["analytic_bwd"], f"{r0['ratio_fwd']:.4f}", f"{r0['ratio_bwd']:.4f}",
                             f"{worst:.1e}", r0["count_bytes_fwd"], r0["count_bytes_bwd"]])
    text = table(title=f"EP all-to-all bytes sent by rank 0 (MoE hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, "
                 f"{args.batch}x{args.seq} tokens per rank); counts = the per-expert count exchange, not in the "
                 "token bytes",
                 header=["ep", "dispatcher", "dtype", "copies", "remote out/in", "fwd bytes", "analytic fwd",
                         "bwd bytes", "analytic bwd", "ratio fwd", "ratio bwd", "max abs(ratio-1) all ranks",
                         "counts fwd", "counts bwd"],
                 rows=rows)
    return results, text


def bench_time(args) -> tuple[list[dict], str]:
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        for ep in args.ep:
            if args.experts % ep:
                continue
            for rec in launch(args, "time", ep, ["--dtype", "float32"]):
                runs.setdefault((ep, rec["hidden"], rec["chunks"]), []).append(rec)
    results, rows = [], []
    for (ep, hidden, chunks), recs in sorted(runs.items()):
        med = statistics.median(r["median_ms"] for r in recs)
        results.append({"ep": ep, "hidden": hidden, "intermediate": 2 * hidden, "chunks": chunks,
                        "median_ms": med, "launch_medians_ms": [r["median_ms"] for r in recs],
                        "steps_per_launch": recs[0]["steps"]})
    for r in results:
        if r["chunks"] == 1:
            o = next(x for x in results if x["ep"] == r["ep"] and x["hidden"] == r["hidden"] and x["chunks"] > 1)
            rows.append([r["ep"], f"{r['hidden']}/{r['intermediate']}", f"{r['median_ms']:.2f}",
                         f"{o['median_ms']:.2f} ({o['chunks']} chunks)", f"{r['median_ms'] / o['median_ms']:.2f}x",
                         " ".join(f"{v:.1f}" for v in r["launch_medians_ms"]),
                         " ".join(f"{v:.1f}" for v in o["launch_medians_ms"])])
    text = table(title=f"MoE layer forward+backward, ms (median over {args.repeats} launches of the per-launch median of "
                 f"{args.steps} steps, max over ranks; {args.experts} experts, top-{args.top_k}, "
                 f"{args.batch}x{args.seq} tokens per rank, fp32, gloo, {args.threads} thread(s) per rank)",
                 header=["ep", "hidden/inter", "plain", "overlapped", "plain/overlapped", "plain per launch",
                         "overlap per launch"], rows=rows)
    return results, text


def bench_gemm(args) -> tuple[list[dict], str]:
    import torch

    from engine.ops import moe as ops

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results, rows = [], []
    for shape in args.gemm_shapes:
        hidden, inter = map(int, shape.split("x"))
        for dtype_name in args.gemm_dtypes:
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(0)
            logits = torch.randn(args.gemm_tokens, args.experts, generator=gen) @ torch.diag(torch.linspace(0.5, 2, args.experts))
            idx = logits.topk(args.top_k, -1).indices
            counts = torch.bincount(idx.flatten(), minlength=args.experts).to(device)
            rows_n = int(counts.sum())
            x0 = (torch.randn(rows_n, hidden, generator=gen) * 0.5).to(device, dtype)
            w1 = (torch.randn(args.experts, 2 * inter, hidden, generator=gen) * 0.05).to(device, dtype)
            w2 = (torch.randn(args.experts, hidden, inter, generator=gen) * 0.05).to(device, dtype)
            g = torch.randn(rows_n, hidden, generator=gen).to(device, dtype)
            out = {}
            key = (device.type, dtype)
            ops._GROUPED_OK.pop(key, None)
            engine_choice = "grouped" if ops._use_grouped_kernel(x0, w1.transpose(1, 2)) else "loop"  # what grouped_mm would pick
            for path in ("grouped", "loop"):
                # Each path forced through the engine's own switch (the probe is bypassed: see the docs).
                ops._GROUPED_OK[key] = path == "grouped"
                x, a, b = (t.detach().clone().requires_grad_() for t in (x0, w1, w2))

                def step():
                    y = ops.expert_ffn(x, counts, a, b)
                    y.backward(g)
                    return y
                for _ in range(3):
                    y = step()
                ts = []
                for _ in range(args.gemm_reps):
                    x.grad = a.grad = b.grad = None
                    sync()
                    t0 = time.perf_counter()
                    y = step()
                    sync()
                    ts.append(time.perf_counter() - t0)
                out[path] = (statistics.median(ts) * 1e3, y.detach().float(), a.grad.float(), x.grad.float())
            ops._GROUPED_OK.pop(key, None)
            (tg, yg, wg, xg), (tl, yl, wl, xl) = out["grouped"], out["loop"]
            rec = {"device": device.type, "hidden": hidden, "intermediate": inter, "dtype": dtype_name,
                   "rows": rows_n, "experts": args.experts, "reps": args.gemm_reps, "grouped_ms": tg, "loop_ms": tl,
                   "speedup": tl / tg, "engine_probe_picks": engine_choice,
                   "max_abs_diff_out": (yg - yl).abs().max().item(),
                   "max_abs_diff_grad_w": (wg - wl).abs().max().item(),
                   "max_abs_diff_grad_x": (xg - xl).abs().max().item()}
            results.append(rec)
            rows.append([device.type, f"{hidden}/{inter}", dtype_name, rows_n, f"{tg:.2f}", f"{tl:.2f}",
                         f"{tl / tg:.2f}x", f"{rec['max_abs_diff_out']:.1e}", engine_choice])
    text = table(title=f"expert_ffn forward+backward, ms (median of {args.gemm_reps}; {args.experts} experts, "
                 f"{args.gemm_tokens} tokens x top-{args.top_k}, uneven loads, {args.threads} thread(s))",
                 header=["device", "hidden/inter", "dtype", "rows", "grouped_mm", "per-expert loop", "loop/grouped",
                         "max abs diff out", "engine picks"], rows=rows)
    return results, text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    parts = [p for p in (args.only or PARTS) if p not in args.skip]
    report = {"command": command("bench_moe", argv), "machine": machine(), "args": {k: v for k, v in vars(args).items() if k not in ("worker", "dtype")}}
    texts = []
    for part, fn in (("volume", bench_volume), ("time", bench_time), ("gemm", bench_gemm)):
        if part in parts:
            t0 = time.time()
            report[part], text = fn(args)
            print(text, flush=True)
            texts.append(text)
            report.setdefault("seconds", {})[part] = round(time.time() - t0, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["tables"] = texts
    save_report(report, Path(args.out))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
