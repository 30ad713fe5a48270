"""User-data pipeline benchmark: prepare throughput, reader memory, loader vs training step.

Three parts (`--parts prepare,memory,loader`, default all); each writes its results into
the JSON report as soon as it finishes, so a crash keeps the parts before it.

- prepare: `engine.data.tokenize_corpus.prepare_folder` with 1 and with 2 processes on
  about `--prepare-mb` MB of JSONL text (`{"text": ...}` rows: the Shakespeare documents of
  the cached corpus, repeated in seeded shuffled order until the size is reached), with a
  byte-level BPE of `--vocab` ids made by `omni_datasets.sft_text.make.make_tokenizer`.
  The file is cut into an even number of equal work units so that 2 processes get equal
  work. Reports tokens/s and the speed-up of 2 processes over 1, checks that both
  folders hold the same token stream and document offsets, and times the start-up of one
  worker process alone (imports + tokenizer load), which each process count pays once.
- memory: two prepared folders written directly with `ShardWriter` + `write_meta`
  (random uint32 tokens below `--vocab`, documents of 50-2000 tokens), `--small-mb` MB
  and `--large-gb` GB of tokens. For each, a fresh child process opens `TokenShards`,
  builds `TextWindows` (seq 4096) and `UserData` and reads `--memory-steps` global batches
  of 8 (the sampler permutes, so they are spread over the whole corpus). Peak RSS is the
  child's VmHWM: Linux carries `ru_maxrss` over from the parent across fork + exec, so a
  child's ru_maxrss is at least the parent's RSS (both are recorded). The two peaks must
  be within `--max-rss-diff-mb` (100) MB of each other.
- loader: `UserData.micro_batches(step, 8, 0, 1, 8)` timed over `--loader-steps` steps for
  a `text` source (the prepared text folder, seq 2048) and a `conversations` source
  (`--conversations` rows from `omni_datasets.sft_text.make.conversations`, ChatML
  template, prepared with kind=conversations); then the tokens/s of training
  `examples/configs/tiny_dense.yaml` at the same seq_len and batch (`pretrain_omni.py` in
  a subprocess, median of metrics.jsonl `tokens_per_s` after the first step). Reports
  loader tokens/s / training tokens/s (the loader must be far ahead: >= `--min-loader-ratio`).

    python -m benchmarks.bench_data                               # full run, writes docs/bench_data.json
    python -m benchmarks.bench_data --quick --out /tmp/bench_data_quick.json     # smoke run, < 1 min
    python -m benchmarks.bench_data --parts memory --large-gb 4 --tmp-dir /scratch --out /tmp/m.json

Exit status 1 when a check fails (the report is written first).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# Top-level imports stay light (stdlib only): prepare's spawned workers import this module
# as __mp_main__, and should do no more work than tools/prepare_data.py's workers do.
from benchmarks.common import ROOT, command, fmt, load_average, save_report, table  # stdlib only
from benchmarks.common import machine as common_machine

PARTS = ("prepare", "memory", "loader")
MiB = 1 << 20


# ------------------------------------------------------------------------ setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of prepare,memory,loader")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: prepare 5 MB, memory 5 MB / 100 MB, loader 20 steps on 1000 conversations, "
                        "2 training steps")
    g = p.add_argument_group("prepare")
    g.add_argument("--prepare-mb", type=float, default=50, help="JSONL text to tokenise (MB)")
    g.add_argument("--chunk-mb", type=float, default=0,
                   help="bytes per work unit (MB); 0: the file cut into an even number of equal units near 8 MB")
    g.add_argument("--vocab", type=int, default=4096, help="BPE tokenizer size (and the memory part's token range)")
    g.add_argument("--tokenizer-docs", type=int, default=2000, help="documents the BPE is trained on")
    g = p.add_argument_group("memory")
    g.add_argument("--small-mb", type=float, default=10, help="tokens of the small folder (MB of uint32)")
    g.add_argument("--large-gb", type=float, default=2, help="tokens of the large folder (GB of uint32)")
    g.add_argument("--shard-mb", type=float, default=64, help="tokens per shard of the written folders (MB)")
    g.add_argument("--memory-steps", type=int, default=50)
    g.add_argument("--memory-seq-len", type=int, default=4096)
    g.add_argument("--memory-batch", type=int, default=8)
    g.add_argument("--max-rss-diff-mb", type=float, default=100)
    g = p.add_argument_group("loader")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--batch", type=int, default=8, help="global batch (one micro-batch)")
    g.add_argument("--loader-steps", type=int, default=200)
    g.add_argument("--conversations", type=int, default=5000)
    g.add_argument("--train-steps", type=int, default=5, help="tiny_dense steps (the first is left out of the median)")
    g.add_argument("--min-loader-ratio", type=float, default=10.0,
                   help="loader tokens/s must be at least this multiple of training tokens/s")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache-dir", default="~/.cache/omni-engine", help="where the Shakespeare corpus is cached")
    g.add_argument("--tmp-dir", default=None, help="scratch space for the corpora and folders (default: the system's)")
    g.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    g.add_argument("--out", default=str(ROOT / "docs" / "bench_data.json"))
    g.add_argument("--probe-memory", metavar="FOLDER", help=argparse.SUPPRESS)  # internal: the RSS child
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    if args.quick:
        args.prepare_mb, args.small_mb, args.large_gb = 5, 5, 0.1
        args.loader_steps, args.conversations, args.train_steps = 20, 1000, 2
    return args


# --------------------------------------------------------------- machine, report


def proc_status() -> dict[str, float]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process in MiB (Linux), plus ru_maxrss."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def machine() -> dict:
    import numpy
    import tokenizers

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError):
        pass
    return common_machine(mem_total_gib=mem, tokenizers=tokenizers.__version__, numpy=numpy.__version__,
                          TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM"))


# ------------------------------------------------------------ shared materials


class Materials:
    """What several parts need, made once in the scratch folder: texts, tokenizer, corpora."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self._texts = self._tok = self._jsonl = None
        self.prepared_text: Path | None = None  # a prepared folder of the text corpus, once there is one
        self.timings: dict[str, float] = {}

    def texts(self) -> list[str]:
        if self._texts is None:
            from engine.data import ensure_corpus, load_documents

            t = time.perf_counter()
            self._texts = list(load_documents(ensure_corpus(Path(self.args.cache_dir).expanduser())))
            self.timings["load_corpus_s"] = time.perf_counter() - t
        return self._texts

    def tokenizer(self) -> Path:
        """A byte-level BPE (ChatML specials and template) trained on a seeded sample of documents."""
        if self._tok is None:
            from omni_datasets.sft_text.make import make_tokenizer

            texts = self.texts()
            sample = random.Random(self.args.seed).sample(texts, min(self.args.tokenizer_docs, len(texts)))
            self._tok = self.work / "tokenizer"
            t = time.perf_counter()
            make_tokenizer(self._tok, sample, vocab_size=self.args.vocab)
            self.timings["make_tokenizer_s"] = time.perf_counter() - t
        return self._tok

    def text_jsonl(self) -> Path:
        """About --prepare-mb MB of {"text": ...} rows: the documents in seeded shuffled passes."""
        if self._jsonl is None:
            texts, target = self.texts(), int(self.args.prepare_mb * 1e6)
            rng = random.Random(self.args.seed)
            path, size, rows, passes = self.work / "text.jsonl", 0, 0, 0
            t = time.perf_counter()
            with open(path, "wb") as f:
                while size < target:
                    order = list(range(len(texts)))
                    rng.shuffle(order)
                    passes += 1
                    for i in order:
                        line = (json.dumps({"text": texts[i]}) + "\n").encode()
                        f.write(line)
                        size, rows = size + len(line), rows + 1
                        if size >= target:
                            break
            self.timings["write_text_jsonl_s"] = time.perf_counter() - t
            self._jsonl, self.jsonl_info = path, {"bytes": size, "rows": rows, "passes": passes}
        return self._jsonl

    def chunk_bytes(self) -> int:
        if self.args.chunk_mb > 0:
            return int(self.args.chunk_mb * MiB)
        size = self.text_jsonl().stat().st_size
        units = 2 * max(1, round(size / (16 * MiB)))  # an even number of ~8 MB units
        return -(-size // units)

    def text_spec(self):
        from engine.data.tokenize_corpus import EncodeSpec

        return EncodeSpec(kind="text", tokenizer=str(self.tokenizer()))

    def text_folder(self) -> Path:
        """The prepared text corpus (prepare's 2-process folder, or prepared now)."""
        if self.prepared_text is None:
            from engine.data.tokenize_corpus import prepare_folder

            folder = self.work / "prepared_text"
            meta = prepare_folder([self.text_jsonl()], folder, self.text_spec(), processes=2,
                                  chunk_bytes=self.chunk_bytes())
            self.timings["prepare_text_for_loader_s"] = meta["seconds"]
            self.prepared_text = folder
        return self.prepared_text


# ---------------------------------------------------------------------- prepare


def same_folders(a: Path, b: Path, chunk: int = 1 << 23) -> dict:
    """Whether two prepared folders hold the same token stream and document offsets."""
    import numpy as np

    from engine.data.token_shards import TokenShards

    A, B = TokenShards(a), TokenShards(b)
    out = {"tokens": len(A.tokens) == len(B.tokens), "doc_offsets": bool(np.array_equal(A.doc_offsets, B.doc_offsets)),
           "shards": len(A.meta["shards"]) == len(B.meta["shards"]), "skipped": A.skipped == B.skipped}
    if out["tokens"]:
        out["tokens"] = all(np.array_equal(A.tokens[lo:lo + chunk], B.tokens[lo:lo + chunk])
                            for lo in range(0, len(A.tokens), chunk))
    out["identical"] = all(out.values())
    return out


def worker_startup_s(spec) -> float:
    """Wall time of what one spawned prepare worker does before its first unit: start Python,
    import engine.data.tokenize_corpus, load the tokenizer (alone, on an otherwise idle machine)."""
    code = ("from engine.data.tokenize_corpus import EncodeSpec, _init_worker\n"
            f"_init_worker(EncodeSpec(kind={spec.kind!r}, tokenizer={spec.tokenizer!r}))\n")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.perf_counter() - t


def part_prepare(args, mat: Materials, report: dict) -> tuple[dict, list[str]]:
    from engine.data.tokenize_corpus import prepare_folder

    jsonl, spec, chunk = mat.text_jsonl(), mat.text_spec(), mat.chunk_bytes()
    size = jsonl.stat().st_size
    print(f"\n## prepare: {size / 1e6:.1f} MB JSONL ({mat.jsonl_info['rows']:,} rows, "
          f"{mat.jsonl_info['passes']} shuffled passes over {len(mat.texts()):,} documents), "
          f"work units of {chunk / MiB:.2f} MiB ({-(-size // chunk)} units), BPE {args.vocab}", flush=True)
    runs = []
    for processes in (1, 2):
        folder = mat.work / f"prepared_p{processes}"
        load = load_average()
        t = time.perf_counter()
        meta = prepare_folder([jsonl], folder, spec, processes=processes, chunk_bytes=chunk)
        wall = time.perf_counter() - t
        runs.append({"processes": processes, "documents": meta["documents"], "tokens": meta["tokens"],
                     "shards": len(meta["shards"]), "skipped": meta["skipped"], "seconds": meta["seconds"],
                     "wall_s": wall, "tokens_per_s": meta["tokens"] / meta["seconds"],
                     "mb_per_s": size / 1e6 / meta["seconds"], "load_average_before": load})
        print(f"  {processes} process(es): {meta['tokens']:,} tokens in {meta['seconds']:.1f} s", flush=True)
    same = same_folders(mat.work / "prepared_p1", mat.work / "prepared_p2")
    mat.prepared_text = mat.work / "prepared_p2"
    startup = worker_startup_s(spec)
    speedup = runs[0]["seconds"] / runs[1]["seconds"]
    # Estimate: the 2-process run less one worker's start-up (both workers start at once).
    speedup_net = runs[0]["seconds"] / max(1e-9, runs[1]["seconds"] - startup)
    result = {"jsonl": {"bytes": size, **mat.jsonl_info}, "chunk_bytes": chunk, "units": -(-size // chunk),
              "tokenizer_vocab": args.vocab, "runs": runs, "speedup_2_vs_1": speedup,
              "speedup_2_vs_1_excluding_worker_startup_est": speedup_net,
              "same_stream_and_offsets": same, "worker_startup_s": startup,
              "bytes_per_token": size / runs[0]["tokens"]}
    print(table(["processes", "documents", "tokens", "seconds", "tokens/s", "MB/s", "speed-up"],
                [[r["processes"], fmt(r["documents"]), fmt(r["tokens"]), fmt(r["seconds"], 2),
                  fmt(r["tokens_per_s"]), fmt(r["mb_per_s"], 2),
                  f"{runs[0]['seconds'] / r['seconds']:.2f}x"] for r in runs], "rrrrrrr"))
    print(f"identical token streams and document offsets (1 vs 2 processes): {same['identical']} {same}")
    print(f"one worker's start-up alone (python + imports + tokenizer): {startup:.1f} s, paid once per run by "
          f"the 2 workers at once; 2 vs 1 process without it (estimate): {speedup_net:.2f}x")
    failures = [] if same["identical"] else [f"prepare: 1 and 2 processes give different folders: {same}"]
    return result, failures


# ----------------------------------------------------------------------- memory


def write_random_folder(folder: Path, total_tokens: int, shard_tokens: int, vocab: int, seed: int) -> dict:
    """A prepared `text` folder of random tokens, written document by document (bounded memory)."""
    import numpy as np

    from engine.data.token_shards import ShardWriter, write_meta

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards, written, in_shard, writer = [], 0, 0, None
    while written < total_tokens:
        lengths = rng.integers(50, 2001, size=2048)  # ~2M tokens (8 MB) per block
        ends = np.cumsum(lengths)
        lengths = lengths[:int(np.searchsorted(ends, total_tokens - written)) + 1]
        tokens = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.uint32)
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            if writer is None:
                writer, in_shard = ShardWriter(folder, f"{len(shards):05d}", with_mask=False), 0
            writer.add(doc)
            in_shard += len(doc)
            written += len(doc)
            if in_shard >= shard_tokens:
                shards.append(writer.close())
                writer = None
    if writer is not None:
        shards.append(writer.close())
    return write_meta(folder, shards, "text", {"path": "random", "vocab_size": vocab}, Counter(), ["random"])


def run_memory_probe(args) -> None:
    """Child process: imports, then open the folder and read batches; print one JSON line."""
    import numpy as np
    import torch  # noqa: F401

    from engine.data.token_shards import TokenShards
    from engine.data.user_data import TextWindows, UserData

    base = proc_status()
    t = time.perf_counter()
    shards = TokenShards(Path(args.probe_memory))
    source = TextWindows(shards, seq_len=args.memory_seq_len, seed=0)
    data = UserData([source], ["data"], None, args.memory_seq_len, 0, 0, packed=False)
    open_s = time.perf_counter() - t
    after_open = proc_status()
    b, picked, steps_s = args.memory_batch, [], []
    for step in range(args.memory_steps):
        t = time.perf_counter()
        batches = data.micro_batches(step, b, 0, 1, b)
        steps_s.append(time.perf_counter() - t)
        assert sum(x.input_ids.shape[0] for x in batches) == b
        picked += [int(source.keep[i]) for r in range(step * b, (step + 1) * b) for _, i in data._row(r)]
    end = proc_status()
    where = np.asarray(picked) / len(source.windows)
    print(json.dumps({"windows": len(source.windows), "documents": len(shards), "tokens": len(shards.tokens),
                      "shards": len(shards.meta["shards"]), "baseline": base, "after_open": after_open, "end": end,
                      "peak_rss_mib": end["VmHWM"], "baseline_rss_mib": base["VmRSS"],
                      "ru_maxrss_mib": end["ru_maxrss"], "open_s": open_s,
                      "step_ms_median": statistics.median(steps_s) * 1e3,
                      "windows_read": len(picked), "window_position_min": float(where.min()),
                      "window_position_max": float(where.max()),
                      "window_position_deciles_hit": len(set((where * 10).astype(int).tolist()))}))


def probe_memory(args, folder: Path) -> dict:
    argv = [sys.executable, "-m", "benchmarks.bench_data", "--probe-memory", str(folder),
            "--memory-steps", str(args.memory_steps), "--memory-seq-len", str(args.memory_seq_len),
            "--memory-batch", str(args.memory_batch)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {folder} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_memory(args, work: Path, report: dict) -> tuple[dict, list[str]]:
    sizes = [("small", int(args.small_mb * 1e6)), ("large", int(args.large_gb * 1e9))]
    shard_tokens = max(1, int(args.shard_mb * 1e6) // 4)
    print(f"\n## memory: random-token folders of {args.small_mb:g} MB and {args.large_gb:g} GB "
          f"(uint32, documents 50-2000 tokens, {args.shard_mb:g} MB shards), read {args.memory_steps} steps of "
          f"{args.memory_batch} x {args.memory_seq_len} in a fresh process each", flush=True)
    result = {"shard_mb": args.shard_mb, "steps": args.memory_steps, "seq_len": args.memory_seq_len,
              "global_batch": args.memory_batch, "rss_measure": "VmHWM of the child (ru_maxrss carries the "
              "parent's RSS over across fork+exec; recorded as ru_maxrss_mib)", "folders": {}}
    for name, nbytes in sizes:
        folder = work / f"memory_{name}"
        t = time.perf_counter()
        meta = write_random_folder(folder, nbytes // 4, shard_tokens, args.vocab, args.seed)
        write_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in folder.iterdir())
        print(f"  wrote {name}: {meta['tokens']:,} tokens, {meta['documents']:,} documents, "
              f"{len(meta['shards'])} shards, {disk / 1e6:,.0f} MB in {write_s:.1f} s", flush=True)
        probe = probe_memory(args, folder)
        shutil.rmtree(folder, ignore_errors=True)
        result["folders"][name] = {"tokens": meta["tokens"], "documents": meta["documents"],
                                   "shards": len(meta["shards"]), "disk_bytes": disk, "write_s": write_s, **probe}
        report["parts"]["memory"] = result  # the small folder's numbers survive a failure on the large one
        save_report(report, Path(args.out))
    s, l = result["folders"]["small"], result["folders"]["large"]
    diff = l["peak_rss_mib"] - s["peak_rss_mib"]
    ok = abs(diff) <= args.max_rss_diff_mb
    result.update({"peak_rss_diff_mib": diff, "max_rss_diff_mib": args.max_rss_diff_mb, "within_limit": ok,
                   "corpus_ratio": l["tokens"] / s["tokens"]})
    rows = []
    for name in ("small", "large"):
        r = result["folders"][name]
        rows.append([name, fmt(r["disk_bytes"] / 1e6), fmt(r["tokens"]), fmt(r["documents"]), r["shards"],
                     fmt(r["baseline_rss_mib"]), fmt(r["peak_rss_mib"]), fmt(r["peak_rss_mib"] - r["baseline_rss_mib"]),
                     fmt(r["end"].get("RssFile"), 1), fmt(r["ru_maxrss_mib"]), fmt(r["open_s"], 3),
                     fmt(r["step_ms_median"], 1), f"{r['window_position_min']:.2f}-{r['window_position_max']:.2f}"])
    print(table(["folder", "MB on disk", "tokens", "documents", "shards", "RSS after imports MiB", "peak RSS MiB",
                 "peak - imports", "file pages mapped MiB (end)", "ru_maxrss MiB", "open s", "step ms",
                 "windows read (corpus span)"], rows, "lrrrrrrrrrrrr"))
    print(f"peak RSS difference large - small: {diff:+.1f} MiB for a {result['corpus_ratio']:.0f}x larger corpus "
          f"(limit {args.max_rss_diff_mb:g}): {'PASS' if ok else 'FAIL'}")
    failures = [] if ok else [f"memory: peak RSS differs by {diff:.1f} MiB (> {args.max_rss_diff_mb:g})"]
    return result, failures


# ----------------------------------------------------------------------- loader


def time_loader(data, steps: int, batch: int, seq_len: int) -> dict:
    times, pads = [], 0
    for step in range(steps):
        t = time.perf_counter()
        batches = data.micro_batches(step, batch, 0, 1, batch)
        times.append(time.perf_counter() - t)
        pads += sum(b.padding_tokens for b in batches)
    total = sum(times)
    slots = steps * batch * seq_len
    return {"steps": steps, "seconds": total, "step_ms_median": statistics.median(times) * 1e3,
            "first_step_ms": times[0] * 1e3, "batches_per_s": steps / total, "tokens_per_s": slots / total,
            "non_pad_tokens_per_s": (slots - pads) / total, "padding_frac": pads / slots}


def conversations_source(args, mat: Materials, work: Path):
    """(UserData, prepare meta) of the conversations source, or raise ImportError when
    engine/data/chat.py is not importable yet."""
    import engine.data.chat  # noqa: F401  (the conversations encoder needs it)
    from engine.data.token_shards import TokenShards
    from engine.data.tokenize_corpus import EncodeSpec, prepare_folder
    from engine.data.user_data import Conversations, UserData
    from omni_datasets.sft_text.make import conversations, write_rows

    rows = conversations(mat.texts(), args.conversations, seed=args.seed)
    path = work / "conversations.jsonl"
    write_rows(rows, path)
    spec = EncodeSpec(kind="conversations", tokenizer=str(mat.tokenizer()))
    meta = prepare_folder([path], work / "prepared_conversations", spec, processes=1)
    t = time.perf_counter()
    shards = TokenShards(work / "prepared_conversations")
    source = Conversations(shards, args.seq_len, truncate=False, strict=False)
    data = UserData([source], ["data"], None, args.seq_len, args.seed, 0, packed=True)
    info = {"setup_s": time.perf_counter() - t, "rows": len(rows), "documents": meta["documents"], "tokens": meta["tokens"], "skipped": meta["skipped"],
            "prepare_s": meta["seconds"], "mean_tokens": meta["tokens"] / max(1, meta["documents"])}
    return data, info


def train_tokens_per_s(args, mat: Materials, folder: Path, work: Path) -> dict:
    """tiny_dense trained a few steps on the prepared text folder at the loader's seq_len / batch."""
    from engine.data.tokenizer import load_tokenizer

    vocab = max(512, load_tokenizer(mat.tokenizer()).vocab_size)
    out = work / "train_tiny_dense"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, str(ROOT / "pretrain_omni.py"), "--config", str(ROOT / "examples/configs/tiny_dense.yaml"),
            "--data.dataset=text", f"--data.path={folder}", f"--data.tokenizer={mat.tokenizer()}",
            f"--data.seq_len={args.seq_len}", f"--data.global_batch_size={args.batch}", f"--model.vocab_size={vocab}",
            f"--train.steps={args.train_steps}", f"--train.output_dir={out}", "--checkpoint.enabled=false",
            "--train.progress_bar=false", "--train.tensorboard=false"]
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [r["tokens_per_s"] for r in records]
    timed = tps[1:] if len(tps) > 1 else tps
    return {"command": " ".join(argv), "model.vocab_size": vocab, "steps": len(records), "wall_s": wall,
            "tokens_per_s_all": tps, "tokens_per_s_median": statistics.median(timed),
            "step_s_median": statistics.median(r["step_time_s"] for r in records[1:] or records),
            "note": "median over the steps after the first; the trainer's step time includes its micro_batches call"}


def part_loader(args, mat: Materials, work: Path, report: dict) -> tuple[dict, list[str]]:
    from engine.data.token_shards import TokenShards
    from engine.data.user_data import TextWindows, UserData

    L, B = args.seq_len, args.batch
    folder = mat.text_folder()
    print(f"\n## loader: micro_batches(step, {B}, 0, 1, {B}) at seq {L}, {args.loader_steps} steps; "
          f"training: tiny_dense, {args.train_steps} steps", flush=True)
    result: dict = {"seq_len": L, "global_batch": B, "rows": {}}
    t = time.perf_counter()
    shards = TokenShards(folder)
    text = UserData([TextWindows(shards, L, args.seed)], ["data"], None, L, args.seed, 0, packed=False)
    setup = time.perf_counter() - t
    result["rows"]["text"] = {"folder_tokens": len(shards.tokens), "documents": len(shards), "setup_s": setup,
                              **time_loader(text, args.loader_steps, B, L)}
    conv_failure = None
    try:
        conv, info = conversations_source(args, mat, work)
        result["rows"]["conversations"] = {**info, **time_loader(conv, args.loader_steps, B, L)}
    except (ImportError, SyntaxError) as e:
        result["rows"]["conversations"] = {"not_run": f"skipped: engine.data.chat is not importable yet ({e})"}
    except Exception as e:  # noqa: BLE001  (keep the text row and the training run)
        result["rows"]["conversations"] = {"not_run": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        conv_failure = f"loader: the conversations source failed: {result['rows']['conversations']['not_run']}"
    report["parts"]["loader"] = result
    save_report(report, Path(args.out))
    failures = [conv_failure] if conv_failure else []
    try:
        result["training"] = train_tokens_per_s(args, mat, folder, work)
    except Exception as e:  # noqa: BLE001  (keep the loader rows; report the training failure)
        result["training"] = {"error": str(e)}
        failures.append(f"loader: the training run failed: {str(e).splitlines()[0]}")
    train_tps = result["training"].get("tokens_per_s_median")
    rows = []
    for name, r in result["rows"].items():
        if "not_run" in r:
            rows.append([name] + ["-"] * 6 + [r["not_run"]])
            continue
        r["ratio_vs_training"] = r["tokens_per_s"] / train_tps if train_tps else None
        rows.append([name, fmt(r["setup_s"], 2), fmt(r["step_ms_median"], 2), fmt(r["batches_per_s"], 1),
                     fmt(r["tokens_per_s"]), fmt(r["non_pad_tokens_per_s"]), fmt(train_tps),
                     f"{r['ratio_vs_training']:,.0f}x" if r["ratio_vs_training"] else "-"])
        if r["ratio_vs_training"] is not None and r["ratio_vs_training"] < args.min_loader_ratio:
            failures.append(f"loader: {name} loader is only {r['ratio_vs_training']:.1f}x the training step's "
                            f"tokens/s (< {args.min_loader_ratio:g}x)")
    print(table(["source", "setup s", "step ms (median)", "batches/s", "tokens/s (row slots)", "non-pad tokens/s",
                 "training tokens/s", "loader / training"], rows, "lrrrrrrr"))
    if "error" in result["training"]:
        print(f"training run failed: {result['training']['error'][:500]}")
    else:
        tr = result["training"]
        print(f"training: tiny_dense (model.vocab_size={tr['model.vocab_size']}) at {B} x {L}: "
              f"{tr['tokens_per_s_median']:,.0f} tokens/s ({tr['step_s_median']:.2f} s/step, median of steps 2-"
              f"{tr['steps']}); the trainer's step time includes its own micro_batches call")
    return result, failures


# ------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        run_memory_probe(args)
        return 0
    # What prepare_folder's workers set (setdefault): one tokenizer thread per process, so that
    # "1 process" means one core. Set here too so the 1-process run (in this process) matches.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = load_average()
    started = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['mem_total_gib']} GiB; "
          f"python {info['python']}, torch {info['torch']}, tokenizers {info['tokenizers']}; "
          f"load average before {load_before}")
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.tmp_dir))
    report = {"benchmark": "user-data pipeline: prepare throughput, reader memory, loader vs training step",
              "command": command("bench_data", argv),
              "machine": info, "load_average_before": load_before, "quick": args.quick,
              "settings": {k: v for k, v in vars(args).items() if k not in ("probe_memory", "out")},
              "scratch": str(work), "status": "running", "parts": {}, "failures": []}
    save_report(report, out)
    mat = Materials(args, work)
    failures: list[str] = []
    try:
        for part in args.parts:
            t = time.perf_counter()
            if part == "prepare":
                result, fails = part_prepare(args, mat, report)
            elif part == "memory":
                result, fails = part_memory(args, work, report)
            else:
                result, fails = part_loader(args, mat, work, report)
            result["part_wall_s"] = time.perf_counter() - t
            result["load_average_after"] = load_average()
            report["parts"][part] = result
            failures += fails
            report["failures"], report["setup_timings"] = failures, mat.timings
            save_report(report, out)
        report["status"] = "done"
    except BaseException as e:
        report["status"] = f"crashed: {type(e).__name__}: {e}"
        raise
    finally:
        report["total_wall_s"] = time.perf_counter() - started
        report["failures"], report["setup_timings"] = failures, mat.timings
        save_report(report, out)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {report['total_wall_s']:.0f} s; wrote {out}")
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
