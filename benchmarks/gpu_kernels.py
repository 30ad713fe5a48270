"""The GPU check's kernel stage: the MoE grouped GEMM at the 30B example's expert shapes, every
attention backend on packed rows and the fused LM-head loss, each timed forward + backward,
checked against a reference; host syncs counted (`torch.cuda.set_sync_debug_mode`) for the first two.

Results are saved after every measurement, so a run cut off by the machine's time limit
still reports what it reached. On CPU (`--device cpu --small`) the same code runs at tiny
shapes: that is how the suite checks this script without a GPU.

    python -m benchmarks.gpu_kernels --out OUT/kernels.json                 # on the GPU machine
    python -m benchmarks.gpu_kernels --device cpu --small --out /tmp/k.json  # plumbing only
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from pathlib import Path

import torch
import yaml

from benchmarks.common import ROOT, command, machine, save_report
from engine.ops import attention
from engine.ops import moe as moe_ops

CONFIG_30B = ROOT / "examples" / "configs" / "omni_moe_30b_a3b.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (checks the script, measures nothing)")
    p.add_argument("--tokens", type=int, default=8192, help="packed tokens per attention call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="outputs/gpu_check/kernels.json")
    return p.parse_args(argv)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def counting_syncs(device: str):
    """Counts the host syncs CUDA reports while the block runs (a list that fills as it goes)."""
    found: list[str] = []
    if device != "cuda":
        yield found
        return
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def timed(fn, device: str, repeats: int) -> dict:
    fn()  # warm-up (kernel selection, autotuning)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return {"ms_median": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times)}


def grouped_gemm_rows(args, report: dict, out: Path) -> None:
    """Expert FFN forward + backward at one EP rank's experts of the 30B config, in bf16,
    fp32 and fp32 under bf16 autocast: which path runs (grouped kernel or per-expert loop)."""
    m = yaml.safe_load(CONFIG_30B.read_text())["model"]
    ep = yaml.safe_load(CONFIG_30B.read_text())["parallel"]["ep_size"]
    experts, hidden, inter = m["num_experts"] // ep, m["hidden_size"], m["moe_intermediate_size"]
    tokens = 8192 * m["num_experts_per_tok"] // ep  # one rank's routed rows of one 8K micro-batch, balanced
    if args.small:
        experts, hidden, inter, tokens = 4, 32, 16, 64
    gen = torch.Generator().manual_seed(0)
    counts = torch.full((experts,), tokens // experts, dtype=torch.long)
    for mode in ("bf16", "fp32", "autocast"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        x = torch.randn(tokens, hidden, generator=gen).to(args.device, dtype).requires_grad_()
        gate_up = (0.02 * torch.randn(experts, 2 * inter, hidden, generator=gen)).to(args.device, dtype)
        down = (0.02 * torch.randn(experts, hidden, inter, generator=gen)).to(args.device, dtype)
        gate_up.requires_grad_(), down.requires_grad_()
        cast = torch.autocast(args.device, dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()

        def step():
            with cast:
                y = moe_ops.expert_ffn(x, counts.to(args.device), gate_up, down)
            y.float().square().mean().backward()

        row = {"experts": experts, "hidden": hidden, "intermediate": inter, "rows": tokens, "mode": mode}
        try:
            with cast:
                xs, gs = moe_ops._autocast_inputs(x, gate_up)
            row["grouped_kernel"] = moe_ops._use_grouped_kernel(xs, gs.transpose(1, 2))
            with counting_syncs(args.device) as syncs:
                row.update(timed(step, args.device, args.repeats))
            row["host_syncs_per_step"] = len(syncs) / (args.repeats + 1)
            flops = 3 * 2 * tokens * hidden * 3 * inter  # fwd + bwd of the three expert matmuls
            row["tflops"] = flops / (row["ms_median"] / 1e3) / 1e12
        except Exception as e:  # record and go on: the other rows still run
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        report["grouped_gemm"].append(row)
        save_report(report, out)
        print("grouped_gemm", row, flush=True)


def packed_documents(tokens: int, seed: int = 0) -> torch.Tensor:
    """[1, tokens] document ids of a packed row: lengths drawn between 1/16 and 1/2 of it."""
    gen = torch.Generator().manual_seed(seed)
    ids, doc, used = [], 0, 0
    while used < tokens:
        n = min(tokens - used, int(torch.randint(tokens // 16, tokens // 2, (1,), generator=gen)))
        ids += [doc] * n
        used, doc = used + n, doc + 1
    return torch.tensor(ids)[None]


def attention_rows(args, report: dict, out: Path) -> None:
    """Every backend on one packed row (the 30B config's heads), bf16 on CUDA, forward +
    backward; outputs compared with one causal SDPA call per document (sdpa_doc)."""
    m = yaml.safe_load(CONFIG_30B.read_text())["model"]
    heads, kv_heads, head_dim, tokens = m["num_heads"], m["num_kv_heads"], m["head_dim"], args.tokens
    if args.small:
        heads, kv_heads, head_dim, tokens = 4, 2, 16, 128
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, tokens, head_dim, generator=gen).to(args.device, dtype) for h in (heads, kv_heads,
                                                                                                   kv_heads))
    meta = attention.AttentionMeta(doc_ids=packed_documents(tokens).to(args.device))
    reference = attention.sdpa_by_document(q, k, v, meta).float()
    for backend in ("sdpa", "sdpa_doc", "varlen", "flash_attn"):
        row = {"backend": backend, "tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
               "documents": int(meta.doc_ids.max()) + 1}
        try:
            fn = attention.get_attention_fn(backend, args.device, "bf16" if dtype == torch.bfloat16 else "fp32")
        except Exception as e:  # not available here (e.g. flash-attn not installed): say so
            row["skipped"] = str(e)[:200]
            report["attention"].append(row)
            save_report(report, out)
            print("attention", row, flush=True)
            continue
        try:
            qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
            fresh = attention.AttentionMeta(doc_ids=meta.doc_ids)
            with torch.no_grad():
                row["max_abs_diff_vs_sdpa_doc"] = float((fn(qs, ks, vs, fresh).float() - reference).abs().max())

            def step():
                fn(qs, ks, vs, attention.AttentionMeta(doc_ids=meta.doc_ids)).float().square().mean().backward()

            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with counting_syncs(args.device) as syncs:
                row.update(timed(step, args.device, args.repeats))
            row["host_syncs_per_step"] = len(syncs) / (args.repeats + 1)
            if args.device == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        report["attention"].append(row)
        save_report(report, out)
        print("attention", row, flush=True)


def fused_loss_rows(args, report: dict, out: Path) -> None:
    """The LM head + loss at 4,096 tokens x hidden 896 x a 151,936-word vocabulary, forward and
    backward: plain logits vs the chunked path vs Liger's kernel (where installed), peak memory
    above the inputs, and the loss and hidden-state gradient against the plain path."""
    from engine.ops.fused_loss import linear_cross_entropy, liger_available

    tokens, hidden, vocab = (64, 32, 1000) if args.small else (4096, 896, 151_936)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).to(args.device, dtype)
    w = (0.02 * torch.randn(vocab, hidden, generator=gen)).to(args.device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(args.device)
    ref = None
    for setting in ("off", "chunked", "liger"):
        row = {"path": setting, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype)}
        if setting == "liger" and not (args.device == "cuda" and liger_available()):
            row["skipped"] = "needs CUDA and liger-kernel"
            report["fused_loss"].append(row)
            save_report(report, out)
            continue
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()

        def step():
            loss, _ = linear_cross_entropy(hs, ws, labels, setting=setting)
            loss.backward()
            return loss

        try:
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            loss = step()
            if args.device == "cuda":
                torch.cuda.synchronize()
                row["peak_above_inputs_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            got = (float(loss), hs.grad.float().clone())
            if ref is None:
                ref = got
            row["loss_rel_diff_vs_plain"] = abs(got[0] - ref[0]) / abs(ref[0])
            row["grad_max_abs_diff_vs_plain"] = float((got[1] - ref[1]).abs().max())
            hs.grad = ws.grad = None
            row.update(timed(step, args.device, args.repeats))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        report["fused_loss"].append(row)
        save_report(report, out)
        print("fused_loss", row, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    report = {"benchmark": "GPU kernels: MoE grouped GEMM and attention backends",
              "command": command("benchmarks.gpu_kernels", argv), "machine": machine(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "grouped_gemm": [], "attention": [], "fused_loss": []}
    save_report(report, out)
    grouped_gemm_rows(args, report, out)
    attention_rows(args, report, out)
    fused_loss_rows(args, report, out)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
