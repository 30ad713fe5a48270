"""One process of `python -m benchmarks.bench_sp` (plain for sp 1, under torch.distributed.run for sp > 1).

    python -m benchmarks.bench_sp_worker comm JSON_ARGS   # all-to-all bytes per layer, fwd and bwd
    python -m benchmarks.bench_sp_worker mem  JSON_ARGS   # peak live tensor bytes of one fwd+bwd step (every rank)
    python -m benchmarks.bench_sp_worker search JSON_ARGS # longest sequence within a budget (one process)
    python -m benchmarks.bench_sp_worker time JSON_ARGS   # median step time, sync vs async

Every mode prints one line `BENCH_SP {json}` per result on each rank, and appends it to
`<results_dir>/rank<r>.jsonl` when the arguments name a results_dir (what the parent reads:
lines of several ranks sharing one pipe may interleave).
Models are built by the engine's own `Trainer` (meta device -> Ulysses hooks -> FSDP2 over
the SP ranks -> materialise), with batches from the real packed Shakespeare data.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.live_bytes import LiveBytes
from engine.comm import STATS, init_distributed, shutdown
from engine.config import Config
from engine.config_validation import validate
from engine.data.packing import micro_batches
from engine.training.trainer import Trainer, token_loss_sum

OUT_DIR = tempfile.mkdtemp(prefix="bench_sp_")  # train.output_dir (nothing is saved); removed at exit
atexit.register(shutil.rmtree, OUT_DIR, ignore_errors=True)


RESULTS_DIR = None  # set from the JSON arguments: every rank appends its records to rank<r>.jsonl there


def emit(rank: int, **record) -> None:
    line = json.dumps({"rank": rank, **record})
    if RESULTS_DIR:
        with open(Path(RESULTS_DIR) / f"rank{rank}.jsonl", "a") as f:
            f.write(line + "\n")
    sys.stdout.write("BENCH_SP " + line + "\n")
    sys.stdout.flush()


def make_config(a: dict, seq: int, sp: int, sp_async: bool = False, dtype: str = "fp32") -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size = a["vocab"], a["hidden"], a["intermediate"]
    m.num_layers, m.num_heads, m.num_kv_heads = a["layers"], a["heads"], a["kv_heads"]
    m.attention_backend = a.get("attention", "auto")
    m.max_position_embeddings = max(m.max_position_embeddings, seq)
    cfg.data.seq_len, cfg.data.global_batch_size = seq, a["batch"]
    cfg.parallel.sp_size, cfg.parallel.sp_async = sp, sp_async
    cfg.train.dtype, cfg.train.device, cfg.train.steps, cfg.train.warmup_steps = dtype, "cpu", 1000, 1
    cfg.train.output_dir, cfg.train.tensorboard, cfg.train.progress_bar = OUT_DIR, False, False
    cfg.checkpoint.enabled, cfg.checkpoint.interval, cfg.checkpoint.resume = False, 0, "none"
    validate(cfg)
    return cfg


def local_batch(trainer: Trainer, step: int = 0) -> dict:
    """This rank's (single) micro-batch of `step`, sharded over SP, as `Trainer.forward_backward` builds it."""
    cfg = trainer.cfg
    args = (step, cfg.data.global_batch_size, trainer.dp_rank, trainer.dims.dp, trainer.layout["micro_batch"])
    data = getattr(trainer, "data", None)
    (batch,) = data.micro_batches(*args) if data is not None else micro_batches(trainer.dataset, *args)
    return trainer.prepare_batch(batch)


def forward_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    """This rank's loss sum, computed the way `Trainer.forward_backward` computes it."""
    if hasattr(trainer, "loss_sums"):
        return sum(trainer.loss_sums(batch).values())
    with trainer.autocast():
        logits = trainer.model(batch["input_ids"], batch["position_ids"], batch["doc_ids"],
                               attn_meta=batch.get("attn_meta"))
    return token_loss_sum(logits, batch["labels"])


def act_dtype(cfg: Config) -> str:
    """Dtype of the activations that Ulysses exchanges: bf16 compute under train.dtype=bf16."""
    return "torch.bfloat16" if cfg.train.dtype == "bf16" else "torch.float32"


def sp_a2a() -> tuple[int, int]:
    key = ("all_to_all", "sp")
    return STATS.bytes.get(key, 0), STATS.calls.get(key, 0)


def close(trainer: Trainer) -> None:
    trainer.close()
    gc.collect()


# ------------------------------------------------------------------------------------ modes


def run_comm(ctx, a: dict) -> None:
    """Bytes this rank sends in Ulysses all-to-alls, forward and backward separately."""
    for case in a["cases"]:
        for sp_async in (False, True):
            cfg = make_config({**a, **case}, a["seq"], ctx.world_size, sp_async, case.get("dtype", "fp32"))
            trainer = Trainer(cfg, ctx)
            batch = local_batch(trainer)
            STATS.reset()
            loss = forward_loss(trainer, batch)  # the loss adds no collective
            fwd_bytes, fwd_calls = sp_a2a()
            fwd_all = {f"{op}/{axis}": n for (op, axis), n in STATS.bytes.items()}
            STATS.reset()
            loss.backward()
            bwd_bytes, bwd_calls = sp_a2a()
            bwd_all = {f"{op}/{axis}": n for (op, axis), n in STATS.bytes.items()}
            emit(ctx.rank, mode="comm", case=case["name"], sp=ctx.world_size, sp_async=sp_async,
                 heads=cfg.model.num_heads, kv_heads=cfg.model.num_kv_heads, head_dim=cfg.model.hidden_size //
                 cfg.model.num_heads, layers=cfg.model.num_layers, batch=a["batch"], seq=a["seq"],
                 dtype=cfg.train.dtype, act_dtype=act_dtype(cfg), fwd_bytes=fwd_bytes, fwd_calls=fwd_calls,
                 bwd_bytes=bwd_bytes, bwd_calls=bwd_calls, fwd_stats=fwd_all, bwd_stats=bwd_all)
            del loss, batch
            close(trainer)


def causal_only_sdpa(q, k, v, meta):
    """What-if kernel: causal SDPA with no document mask (no S x S tensor at all), the memory
    behaviour of flash-attn's varlen kernel. NOT the same math when a row holds several documents."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def probe(ctx, a: dict, seq: int, kernel: str = "sdpa") -> dict:
    """Peak live tensor bytes of one `Trainer.forward_backward()` at `seq` (stops past the budget)."""
    cfg = make_config(a, seq, ctx.world_size)
    trainer = Trainer(cfg, ctx)
    if kernel == "causal_only":
        for attn in trainer.model.attention_modules():
            attn.attention_fn = causal_only_sdpa
    trainer.optimizer = trainer.scheduler = None  # not part of a forward+backward
    gc.collect()
    t0 = time.perf_counter()
    mem = LiveBytes(budget=a["budget"])
    error = None
    try:
        with mem:
            trainer.forward_backward()
    except Exception as e:  # noqa: BLE001 - BudgetExceeded may arrive wrapped by autograd
        if not mem.exceeded:
            raise
        error = str(e).splitlines()[0][:200]
    seconds = time.perf_counter() - t0
    square = mem.bytes_at_peak(lambda shape: len(shape) >= 2 and shape[-2:] == (seq, seq))
    record = dict(seq=seq, sp=ctx.world_size, kernel=kernel, fits=not mem.exceeded, peak=mem.peak,
                  baseline=mem.baseline, seconds=seconds, backend=ctx.backend)
    if not mem.exceeded:
        record.update(peak_at=mem.peak_tag, square_bytes_at_peak=square, breakdown=mem.peak_breakdown(a.get("top", 8)))
    else:
        record["error"] = error
    del trainer, mem
    gc.collect()
    return record


def run_mem(ctx, a: dict) -> None:
    """One probe at a["seq"] on every rank (real process group); exit 3 if over the budget."""
    rec = probe(ctx, a, a["seq"], a.get("kernel", "sdpa"))
    emit(ctx.rank, mode="mem", **rec)
    if not rec["fits"]:
        sys.stdout.flush()
        os._exit(3)  # peers may be blocked in a collective: let the launcher tear the group down


def predict(rec: dict, budget: int) -> float:
    """Length where a probe's peak, split as q*S^2 (its S x S tensors) + l*S + baseline, meets the budget."""
    seq = rec["seq"]
    q = rec["square_bytes_at_peak"] / seq**2
    lin = max(rec["peak"] - rec["square_bytes_at_peak"] - rec["baseline"], 1) / seq
    room = budget - rec["baseline"]
    return room / lin if q == 0 else (-lin + (lin * lin + 4 * q * room) ** 0.5) / (2 * q)


def run_search(ctx, a: dict) -> None:
    """Longest multiple of a["step"] whose step fits the budget.

    A bracketing search: lo (longest length known to fit) and hi (shortest known to fail)
    shrink until hi - lo == step. The next length probed is the one predicted from the last
    fitting probe's peak (quadratic S x S part + the rest, see `predict`) when it lies strictly
    inside the bracket, else the midpoint, so the answer is exactly what a bisection gives
    with fewer probes. Run in ONE process: plain for sp 1, the `fake` backend (rank 0 of sp
    ranks) for sp > 1, so that a probe over the budget can stop at once without leaving peers
    blocked in a collective.
    """
    step, budget = a["step"], a["budget"]
    known: dict[int, dict] = {}

    def fits(seq: int) -> bool:
        if seq not in known:
            rec = probe(ctx, a, seq)
            emit(ctx.rank, mode="probe", **rec)
            known[seq] = rec
        return known[seq]["fits"]

    lo, hi, last_fit = 0, a["max_seq"] + step, None
    nxt = max(step, a["start"] // step * step)
    while hi - lo > step:
        if fits(nxt):
            lo, last_fit = nxt, known[nxt]
        else:
            hi = nxt
        guess = int(predict(last_fit, budget)) // step * step if last_fit else lo
        if lo < guess < hi and guess not in known:
            nxt = guess
        elif lo < guess + step < hi and guess + step not in known:
            nxt = guess + step  # the prediction fitted: check the next length up
        else:
            floor = a.get("floor", 0)  # a length expected (not known) to fit: bisect above it first
            low = max(lo, floor) if last_fit is None and floor < hi else lo
            nxt = (low + hi) // 2 // step * step
    emit(ctx.rank, mode="search", sp=a["sp"], longest=lo, first_failing=hi, probes=len(known))
    for seq in a.get("whatif", []):  # the causal-only kernel at given lengths (no search)
        emit(ctx.rank, mode="whatif", **probe(ctx, a, seq, "causal_only"))


def run_time(ctx, a: dict) -> None:
    """Median wall time of `Trainer.train_step()` (fwd+bwd+clip+AdamW), sync then async, interleaved."""
    trainers = {m: Trainer(make_config(a, a["seq"], ctx.world_size, m), ctx) for m in (False, True)}
    times = {False: [], True: []}
    for i in range(a["warmup"] + a["steps"]):
        for m in ((False, True) if i % 2 == 0 else (True, False)):
            t = trainers[m].train_step()["step_time_s"]
            if i >= a["warmup"]:
                times[m].append(t)
    for m, ts in times.items():
        emit(ctx.rank, mode="time", sp=ctx.world_size, seq=a["seq"], sp_async=m, median_s=statistics.median(ts),
             all_s=ts)
    for tr in trainers.values():
        close(tr)


def main() -> None:
    global RESULTS_DIR
    mode, a = sys.argv[1], json.loads(sys.argv[2])
    RESULTS_DIR = a.get("results_dir")
    torch.set_num_threads(a.get("threads", 1))
    torch.set_flush_denormal(True)  # fake-backend runs compute on uninitialised receive buffers
    ctx = init_distributed(a.get("backend", "auto"), "cpu", a.get("fake_world", 1), 0)
    try:
        {"comm": run_comm, "mem": run_mem, "search": run_search, "time": run_time}[mode](ctx, a)
    finally:
        gc.collect()
        shutdown()


if __name__ == "__main__":
    main()
