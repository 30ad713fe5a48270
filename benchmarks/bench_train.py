"""Training throughput: this engine vs Hugging Face transformers' LlamaForCausalLM, side by side.

Both train the same Llama-shaped model (same shape, same initial weights: the engine's
seeded initialisation is copied into the HF model), on the same packed batches from
`engine.data.build_text_dataset` + `micro_batches`, with the same AdamW hyper-parameters,
the same warmup + cosine schedule and the same gradient clipping, in fp32, in one process.

- ours: built the way `engine/training/trainer.py` builds it (meta device -> `parallelize`
  -> `materialize`, `build_optimizer` (fused AdamW), `build_scheduler`, the head and loss of `model.fused_loss` as `loss_sums` runs them);
  `ours+compile` is the same with `train.compile=true` (torch.compile per block).
- hf: `LlamaForCausalLM` (sdpa attention, no cache) in the plain PyTorch loop a user
  writes: `model(input_ids, labels=...)`, `loss.backward()`, `clip_grad_norm_`,
  `torch.optim.AdamW` with default settings. Targets are passed as `shift_labels` (HF's
  own argument for pre-shifted labels) so both sides predict exactly the same tokens.
  `--hf-compile` adds an `hf+compile` row (`torch.compile(model)`, what a user would do).

Steps are interleaved one by one (variant order rotated every round) so that background
load on a shared machine hits every variant alike; ratios use medians. Losses of all
variants are reported too: they start from the same weights and see the same batches, so
they must agree (that is the "same math" check).

    python -m benchmarks.bench_train                       # default shape, writes docs/bench_train.json
    python -m benchmarks.bench_train --hidden 512 --layers 8 --steps 30 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine, peak_rss_mib, save_report
from benchmarks.common import load_average as load_averages
from engine.config import Config, expand_path, resolve_layout
from engine.config_validation import validate
from engine.data import build_text_dataset
from engine.data.packing import micro_batches
from engine.models import build_backbone
from engine.parallel import ParallelDims, materialize, parallelize
from engine.training.metrics import compute_precision, device_peak_flops
from engine.training.optimizer import build_optimizer, build_scheduler, clip_grad_norm_
from engine.ops.fused_loss import linear_cross_entropy

VARIANTS = ("ours", "ours+compile", "hf", "hf+compile")


# ------------------------------------------------------------------------ setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("model shape and batch")
    shape.add_argument("--hidden", type=int, default=256)
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--intermediate", type=int, default=688)
    shape.add_argument("--vocab", type=int, default=2048)
    shape.add_argument("--seq-len", type=int, default=256)
    shape.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    shape.add_argument("--rope-theta", type=float, default=10000.0)
    shape.add_argument("--attention", choices=("causal", "packed"), default="causal",
                       help="causal: both models get input_ids only (one causal mask per row, HF's usual call); "
                            "packed: both also get position_ids restarting per document and mask across "
                            "documents (ours via doc_ids, HF detects packing from position_ids)")
    run = p.add_argument_group("run")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                     help="bf16: fp32 weights and bf16 autocast compute on both sides (a one-process run)")
    run.add_argument("--fused-loss", default="auto", help="ours' model.fused_loss (auto: chunked on CPU)")
    run.add_argument("--attention-backend", default="sdpa",
                     help="ours' model.attention_backend (auto picks the varlen flash kernel on CUDA in bf16)")
    run.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    run.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (includes compilation)")
    run.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    run.add_argument("--compile", choices=("off", "on", "both"), default="both",
                     help="time ours without compile, with train.compile=true, or both")
    run.add_argument("--hf-compile", action="store_true", help="also time torch.compile(hf_model)")
    run.add_argument("--warm-compile-cache", action="store_true",
                     help="reuse the on-disk inductor cache; by default a fresh one is used so that the "
                          "first step shows the true compile time")
    run.add_argument("--no-memory", action="store_true",
                     help="skip the peak-RSS probes (one short subprocess per variant)")
    run.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                     help="before building and timing, wait up to this long for the 1-minute load average to "
                          "drop below --max-load (this machine may be shared)")
    run.add_argument("--max-load", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--cache-dir", default=Config().data.cache_dir)
    run.add_argument("--out", default=str(ROOT / "docs" / "bench_train.json"))
    run.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: peak-RSS child
    return p.parse_args(argv)


def engine_config(args, compile_: bool) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size = args.vocab, args.hidden, args.intermediate
    m.num_layers, m.num_heads, m.num_kv_heads, m.rope_theta = args.layers, args.heads, args.kv_heads, args.rope_theta
    m.attention_backend, m.fused_loss = args.attention_backend, args.fused_loss
    cfg.data.seq_len, cfg.data.global_batch_size, cfg.data.cache_dir = args.seq_len, args.batch, args.cache_dir
    t = cfg.train
    t.seed, t.steps, t.dtype, t.device, t.compile = args.seed, args.warmup + args.steps, args.dtype, args.device, compile_
    t.warmup_steps = min(t.warmup_steps, max(1, t.steps // 4))
    validate(cfg)
    return cfg


def load_batches(cfg: Config, n: int) -> list[dict[str, torch.Tensor]]:
    """The batches of optimizer steps 0..n-1, exactly as the Trainer draws them on one rank."""
    dataset, _ = build_text_dataset(expand_path(cfg.data.cache_dir), cfg.model.vocab_size, cfg.data.seq_len,
                                    cfg.train.seed)
    b, device = cfg.data.global_batch_size, torch.device(cfg.train.device)
    return [{k: v.to(device) for k, v in micro_batches(dataset, step, b, 0, 1, b)[0].items()} for step in range(n)]


def autocast(cfg: Config):
    """bf16 compute of a one-process run, as the Trainer does it (fp32 weights, autocast)."""
    if cfg.train.dtype == "bf16":
        return torch.autocast(cfg.train.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Ours:
    """The engine's model and step, assembled from the Trainer's pieces (one rank, no FSDP)."""

    def __init__(self, cfg: Config, packed: bool):
        self.cfg, self.packed = cfg, packed
        dims = ParallelDims.from_layout(resolve_layout(cfg, 1), 1)
        with torch.device("meta"):
            model = build_backbone(cfg.model)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.model = parallelize(model, cfg, dims, None, cfg.train.device)
        materialize(self.model, torch.device(cfg.train.device), cfg.train.seed)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        labels = batch["labels"]
        targets = int((labels != -100).sum())
        with autocast(self.cfg):  # the engine's own head and loss (model.fused_loss), as loss_sums runs them
            if self.packed:
                hidden = self.model(batch["input_ids"], batch["position_ids"], batch["doc_ids"], return_hidden=True)
            else:
                hidden = self.model(batch["input_ids"], return_hidden=True)
            loss, _ = linear_cross_entropy(hidden.flatten(0, 1), self.model.head_weight(), labels.flatten(),
                                           setting=self.cfg.model.fused_loss)
        (loss / targets).backward()
        clip_grad_norm_(self.model, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() / targets


def engine_to_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Engine parameter names -> LlamaForCausalLM names (wrapper prefixes dropped)."""
    out = {}
    for name, t in model.state_dict().items():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        if name.startswith("blocks."):
            name = "model.layers." + name[len("blocks."):]
        elif name.startswith(("embed_tokens.", "norm.")):
            name = "model." + name
        out[name] = t
    return out


class HF:
    """LlamaForCausalLM in the plain loop a user writes, with the same hyper-parameters."""

    def __init__(self, cfg: Config, packed: bool, init_from: torch.nn.Module, compile_: bool):
        import transformers

        m, t = cfg.model, cfg.train
        hf_cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim or m.hidden_size // m.num_heads, max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta, attention_bias=m.attention_bias,
            attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
            hidden_act="silu", attn_implementation="sdpa", dtype=torch.float32)
        assert hf_cfg.rope_parameters["rope_theta"] == m.rope_theta
        self.cfg = cfg
        self.model = transformers.LlamaForCausalLM(hf_cfg).to(device=cfg.train.device, dtype=torch.float32)
        missing, unexpected = self.model.load_state_dict(engine_to_hf_state(init_from), strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
        self.model.train()
        self.packed, self.grad_clip = packed, t.grad_clip
        # Same decay split as ours (and as HF's Trainer): no weight decay on norms.
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
        self.scheduler = build_scheduler(self.optimizer, t)  # same warmup + cosine (a plain LambdaLR)
        self.forward = torch.compile(self.model) if compile_ else self.model

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        labels = batch["labels"]
        kwargs = {"position_ids": batch["position_ids"]} if self.packed else {}
        with autocast(self.cfg):
            out = self.forward(input_ids=batch["input_ids"], labels=labels, shift_labels=labels, **kwargs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.item()


def build_variants(args, names: list[str]) -> dict:
    """Every variant starts from the same weights: ours' seeded init (compile must not change it)."""
    packed = args.attention == "packed"
    base = Ours(engine_config(args, False), packed)
    built = {}
    for name in names:
        if name == "ours":
            built[name] = base
        elif name == "ours+compile":
            built[name] = Ours(engine_config(args, True), packed)
            same = engine_to_hf_state(built[name].model)
            ref = engine_to_hf_state(base.model)
            assert same.keys() == ref.keys() and all(torch.equal(same[k], ref[k]) for k in ref), \
                "compile changed the initial weights (parameter-name seeding)"
        else:
            built[name] = HF(base.cfg, packed, base.model, compile_=name == "hf+compile")
    return built


# --------------------------------------------------------------- measurement


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, to estimate load from other processes."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def load_average() -> float | None:
    """The 1-minute load average."""
    loads = load_averages()
    return loads[0] if loads else None


def wait_idle(seconds: float, max_load: float) -> float | None:
    """Wait (at most `seconds`) for the 1-minute load average to fall below `max_load`."""
    deadline = time.monotonic() + seconds
    load = load_average()
    while load is not None and load >= max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()
    return load


def summarize(times: list[float], cpu: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    mean = statistics.fmean(times)
    return {"steps": len(times), "step_s_mean": mean, "step_s_std": statistics.pstdev(times), "step_s_median": med,
            "step_s_min": min(times), "tokens_per_s_median": tokens / med, "tokens_per_s_mean": tokens / mean,
            "cpu_s_median": statistics.median(cpu), "tokens_per_cpu_s": tokens / statistics.median(cpu),
            "step_s_all": times, "cpu_s_all": cpu}


def run_probe(args) -> None:
    """Child process: build one variant, train a few steps, print its peak RSS (MiB)."""
    torch.set_num_threads(args.threads)
    base_rss = peak_rss_mib()
    cfg = engine_config(args, False)
    batches = load_batches(cfg, args.warmup + args.steps)
    variant = build_variants(args, [args.probe])[args.probe]
    for batch in batches:
        variant.step(batch)
    peak = peak_rss_mib()
    print(json.dumps({"peak_rss_mib": peak, "rss_after_imports_mib": base_rss}))


def probe_memory(args, name: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.bench_train", "--probe", name, "--steps", "2", "--warmup", "1"]
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq_len", "batch", "rope_theta",
                "attention", "threads", "seed", "cache_dir", "dtype", "attention_backend", "fused_loss"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        return {"peak_rss_mib": None, "error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        run_probe(args)
        return {}
    torch.set_num_threads(args.threads)
    cache = None
    if not args.warm_compile_cache:  # read by inductor at its first compile; the RSS probes inherit it
        cache = tempfile.TemporaryDirectory(prefix="bench_train_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    names = {"off": ["ours"], "on": ["ours+compile"], "both": ["ours", "ours+compile"]}[args.compile] + ["hf"]
    if args.hf_compile:
        names.append("hf+compile")
    info = machine()
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores, torch threads {info['torch_threads']}")
    print(f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}")

    cfg = engine_config(args, False)
    batches = load_batches(cfg, args.warmup + args.steps)
    tokens = args.batch * args.seq_len
    if args.wait_idle > 0:  # before compiling, so that the compile times are not inflated either
        print(f"load average {wait_idle(args.wait_idle, args.max_load)} (waited for < {args.max_load})")
    t0 = time.perf_counter()
    variants = build_variants(args, names)
    n_params = sum(p.numel() for p in variants["ours"].model.parameters()) if "ours" in variants else None
    print(f"built {', '.join(names)} in {time.perf_counter() - t0:.1f}s; "
          f"{tokens} tokens/step ({args.batch} x {args.seq_len}), attention={args.attention}")

    losses = {n: [] for n in names}
    warm_s = {n: [] for n in names}
    for i in range(args.warmup):  # warmup (and compilation) one variant at a time
        for n in names:
            t = time.perf_counter()
            losses[n].append(variants[n].step(batches[i]))
            warm_s[n].append(time.perf_counter() - t)
    load_at_start = load_average()
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    before, cpu_before = cpu_jiffies(), time.process_time()
    for i in range(args.warmup, args.warmup + args.steps):  # timed: one step each, order rotated per round
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t, c = time.perf_counter(), time.process_time()
            losses[n].append(variants[n].step(batches[i]))
            times[n].append(time.perf_counter() - t)
            cpu[n].append(time.process_time() - c)
    after, cpu_after = cpu_jiffies(), time.process_time()
    load_at_end = load_average()
    background = None
    if before and after:  # busy share of all cores not spent by this process during the timed steps
        total_s = (after[1] - before[1]) / os.sysconf("SC_CLK_TCK")
        busy_s = (after[0] - before[0]) / os.sysconf("SC_CLK_TCK")
        background = max(0.0, busy_s - (cpu_after - cpu_before)) / max(total_s, 1e-9)

    results = {}
    for n in names:
        r = summarize(times[n], cpu[n], tokens)
        r["warmup_s"] = warm_s[n]
        r["first_step_s"] = warm_s[n][0] if warm_s[n] else None
        r["losses"] = losses[n]
        results[n] = r
    hf_med = results["hf"]["step_s_median"]
    for n in names:
        r = results[n]
        r["speedup_vs_hf_median"] = hf_med / r["step_s_median"]
        # paired: ratio of the two step times of the same round, median over rounds
        r["speedup_vs_hf_paired"] = statistics.median(h / o for h, o in zip(times["hf"], times[n]))
        r["first_loss_rel_diff_vs_hf"] = abs(losses[n][0] - losses["hf"][0]) / abs(losses["hf"][0])
        r["max_rel_loss_diff_vs_hf"] = max(abs(a - b) / abs(b) for a, b in zip(losses[n], losses["hf"]))
    if args.device == "cuda":  # MFU against the device's dense peak for this compute precision
        peak = device_peak_flops(torch.device("cuda"), compute_precision(args.dtype, torch.backends.cuda.matmul.allow_tf32))
        fpt = variants["ours"].flops_per_token if "ours" in variants else None
        for n in names:
            results[n]["mfu"] = None if peak is None or fpt is None else fpt * results[n]["tokens_per_s_median"] / peak
    elif not args.no_memory:  # peak RSS per variant, each in a child process (CPU only)
        for n in names:
            results[n].update(probe_memory(args, n))

    print()
    head = f"{'variant':<14}{'tok/s (med)':>12}{'step ms mean':>14}{'std':>8}{'median':>9}{'min':>8}" \
           f"{'vs HF':>8}{'paired':>8}{'first step s':>14}{'peak RSS MiB':>14}{'loss0':>9}{'loss end':>10}"
    print(head)
    print("-" * len(head))
    for n in names:
        r = results[n]
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else (f"mfu {r['mfu']:.1%}" if r.get("mfu") else "-")
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
        print(f"{n:<14}{r['tokens_per_s_median']:>12.0f}{r['step_s_mean'] * 1e3:>14.1f}{r['step_s_std'] * 1e3:>8.1f}"
              f"{r['step_s_median'] * 1e3:>9.1f}{r['step_s_min'] * 1e3:>8.1f}{r['speedup_vs_hf_median']:>7.2f}x"
              f"{r['speedup_vs_hf_paired']:>7.2f}x{first:>14}{rss:>14}{r['losses'][0]:>9.4f}{r['losses'][-1]:>10.4f}")
    print("\nCPU seconds per step (this process, median): "
          + ", ".join(f"{n} {results[n]['cpu_s_median'] * 1e3:.0f} ms" for n in names)
          + f"; ours/HF by CPU time: {results['hf']['cpu_s_median'] / results[names[0]]['cpu_s_median']:.2f}x ({names[0]})")
    if background is not None:
        print(f"machine load: 1-min load average {load_at_start} at start of timing, {load_at_end} at end; CPU busy with other processes during "
              f"the timed steps: {background:.0%} of the machine")
    print("same math (same weights, same batches): relative loss difference vs hf at step 1: "
          + ", ".join(f"{n} {results[n]['first_loss_rel_diff_vs_hf']:.1e}" for n in names if n != "hf")
          + "; max over all steps: "
          + ", ".join(f"{n} {results[n]['max_rel_loss_diff_vs_hf']:.1e}" for n in names if n != "hf"))

    report = {
        "benchmark": "train step throughput, engine vs transformers LlamaForCausalLM",
        "command": "python -m benchmarks.bench_train " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab",
                                                 "seq_len", "batch", "rope_theta", "attention")},
        "params": n_params, "tokens_per_step": tokens, "dtype": args.dtype, "device": args.device,
        "attention_backend": args.attention_backend, "fused_loss": args.fused_loss,
        "peak_cuda_memory_gib_all_variants": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "optimizer": {"lr": cfg.train.lr, "betas": [cfg.train.beta1, cfg.train.beta2], "weight_decay":
                      cfg.train.weight_decay, "warmup_steps": cfg.train.warmup_steps, "grad_clip": cfg.train.grad_clip,
                      "ours": "torch.optim.AdamW(fused=True)", "hf": "torch.optim.AdamW() defaults"},
        "warmup_steps": args.warmup, "timed_steps": args.steps, "background_cpu_fraction": background,
        "load_average_at_start": load_at_start, "load_average_at_end": load_at_end,
        "compile_cache": "warm (existing inductor cache)" if args.warm_compile_cache else "cold (fresh inductor cache)",
        "results": results,
    }
    out = Path(args.out)
    save_report(report, out)
    print(f"wrote {out}")
    if cache is not None:
        cache.cleanup()
    return report


if __name__ == "__main__":
    main()
