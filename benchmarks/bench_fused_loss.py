"""Fused linear cross-entropy (engine/ops/fused_loss.py) vs the plain LM head + loss.

1. Peak tensor bytes of one loss forward + backward (`LiveBytes`, benchmarks/live_bytes.py)
   for a `--vocab` (151,936: Qwen2's) word head at `--tokens` (4,096) tokens of width
   `--hidden` (896), in fp32 and bf16 (bf16 hidden states and weight, as FSDP's bf16
   compute gives them). The tensors live on the meta device: their sizes are real, nothing
   is allocated or computed, so the measurement takes seconds on any machine. Reported:
   the peak above the baseline (weight, hidden states, labels), with what is live at it.
2. Time of one forward + backward on this CPU at a smaller size (`--time-*`; 0 tokens skips
   it), plain vs chunked, fp32, median of `--reps`.

    python -m benchmarks.bench_fused_loss                 # writes docs/bench_fused_loss.json
    python -m benchmarks.bench_fused_loss --time-tokens 0 --out /tmp/fused.json   # memory only
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, command, machine, save_report, table
from benchmarks.live_bytes import LiveBytes
from engine.batch import IGNORE_INDEX
from engine.ops.fused_loss import chunk_rows, linear_cross_entropy

MIB = 2**20
PATHS = {"plain": "off", "chunked": "chunked"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--time-tokens", type=int, default=1024)
    p.add_argument("--time-vocab", type=int, default=32_000)
    p.add_argument("--time-hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_fused_loss.json"))
    return p.parse_args(argv)


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::10] = IGNORE_INDEX  # some positions are no target
    return h, w, labels.to(device)


def memory(args, dtype: torch.dtype, path: str) -> dict:
    h, w, labels = inputs(args.tokens, args.hidden, args.vocab, dtype, "meta")
    with LiveBytes(meta=True) as mem:
        loss, _ = linear_cross_entropy(h, w, labels, setting=PATHS[path])
        loss.backward()
    return {"dtype": str(dtype)[6:], "path": path, "peak_bytes": mem.peak - mem.baseline,
            "baseline_bytes": mem.baseline, "logits_bytes": args.tokens * args.vocab * 4,
            "at_peak": mem.peak_breakdown(4)}


def timing(args, path: str) -> dict:
    h, w, labels = inputs(args.time_tokens, args.time_hidden, args.time_vocab, torch.float32, "cpu")
    times = []
    for _ in range(args.reps + 1):  # the first is a warm-up
        h.grad = w.grad = None
        t = time.perf_counter()
        loss, _ = linear_cross_entropy(h, w, labels, setting=PATHS[path])
        loss.backward()
        times.append(time.perf_counter() - t)
    return {"path": path, "median_s": statistics.median(times[1:]), "loss": loss.item(),
            "grads": [h.grad.clone(), w.grad.clone()]}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"command": command("bench_fused_loss", argv), "machine": machine(), "args": vars(args),
              "chunk_rows": chunk_rows(args.vocab, args.hidden, args.tokens)}
    rows = [memory(args, dtype, path) for dtype in (torch.float32, torch.bfloat16) for path in PATHS]
    report["memory"] = rows
    plain = {r["dtype"]: r["peak_bytes"] for r in rows if r["path"] == "plain"}
    print(table(["dtype", "path", "peak above baseline MiB", "vs plain", "largest tensor live at the peak"],
                [[r["dtype"], r["path"], f"{r['peak_bytes'] / MIB:,.0f}", f"{r['peak_bytes'] / plain[r['dtype']]:.3f}",
                  r["at_peak"][0]["tensor"]] for r in rows], align="llrrl",
                title=f"Peak tensor bytes of one LM-head loss forward + backward: {args.tokens} tokens, hidden "
                      f"{args.hidden}, vocabulary {args.vocab:,} (fp32 logits alone: "
                      f"{args.tokens * args.vocab * 4 / MIB:,.0f} MiB; baseline weight + hidden "
                      f"{rows[0]['baseline_bytes'] / MIB:,.0f} MiB in fp32); chunks of {report['chunk_rows']} rows"))
    if args.time_tokens:
        times = {path: timing(args, path) for path in PATHS}
        ref = times["plain"]
        for r in times.values():
            grads = r.pop("grads")
            r["max_rel_grad_diff_vs_plain"] = max(((a - b).norm() / b.norm()).item()
                                                  for a, b in zip(grads, ref.get("grads_ref", grads)))
            ref.setdefault("grads_ref", grads)
        ref.pop("grads_ref")
        report["time"] = {"tokens": args.time_tokens, "vocab": args.time_vocab, "hidden": args.time_hidden,
                          "threads": args.threads, "rows": list(times.values())}
        print(table(["path", "fwd+bwd s (median)", "loss", "max rel. grad diff vs plain"],
                    [[r["path"], f"{r['median_s']:.3f}", f"{r['loss']:.6f}", f"{r['max_rel_grad_diff_vs_plain']:.1e}"]
                     for r in times.values()], align="lrrr",
                    title=f"CPU time, fp32, {args.time_tokens} tokens, hidden {args.time_hidden}, vocabulary "
                          f"{args.time_vocab:,}, {args.threads} threads"))
    save_report(report, Path(args.out))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
