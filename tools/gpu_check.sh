#!/usr/bin/env bash
# The prepared GPU check: run it first on any lent CUDA machine, then record its table in
# docs/performance.md (device, versions, tokens/s, MFU, memory).
#
#   bash tools/gpu_check.sh [OUT_DIR]          (default outputs/gpu_check)
#   GPU_CHECK_ONLY='parity|moe' bash tools/gpu_check.sh     (only stages matching the regex)
#
# Needs torch with CUDA and the project's dependencies importable. The project is installed
# with `pip install --no-deps -e .` (nothing fetched), and wheels the machine lacks (torchao,
# liger-kernel) from .gpucache/wheels/*.whl when present (`--no-index --no-deps`). The data
# cache comes from $OMNI_CACHE (default ~/.cache/omni-engine), or from .gpucache/cache.tar.xz
# when present (a machine without network gets the cache that way; see docs/performance.md).
# `bash tools/gpu_prepare.sh` makes both on a CPU machine with network (~43 MB).
#
# Stages, in order of importance, each under its own time limit so one hang cannot eat
# the machine's time; every stage appends {stage, rc, seconds} to stages.jsonl as it ends:
#   env       nvidia-smi and versions
#   apis      every torch API the engine uses exists in this torch (tools/check_torch_apis.py)
#   tests     the gpu-marked tests
#   kernels   MoE grouped GEMM at the 30B example's expert shapes (bf16 / fp32 / autocast) and
#             every attention backend on a packed 8K row, with host syncs counted
#             (benchmarks/gpu_kernels.py -> kernels.json)
#   syncs     host syncs per training step of the tiny dense / MoE / omni configs in bf16, by line
#             of engine code (benchmarks/gpu_sync_audit.py -> syncs.json)
#   throughput  a ~1B dense Llama at seq 4096 in bf16: the engine vs transformers in one
#             process, tokens/s and MFU (benchmarks/bench_train.py -> bench_train_1b.json)
#   fp8       tiny_dense 30 steps in fp8 (torchao, from .gpucache/wheels) vs bf16: final losses
#   nccl      NCCL at world 1 (torchrun): 4 steps with a checkpoint at 2, then resumed to 6;
#             deterministic mode (CUBLAS_WORKSPACE_CONFIG) for 3 steps
#   omni      the default omni model on CUDA in bf16 (full run), then its held-out scores
#   parity    tiny dense / MoE / omni: first loss on CUDA fp32 and bf16 vs the CPU's
#   moe       the tiny MoE model in bf16 with compile and activation checkpointing
# summary.json and the printed table gather first/last loss, tokens/s, MFU and memory.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$(mkdir -p "${1:-outputs/gpu_check}" && cd "${1:-outputs/gpu_check}" && pwd)"
RUNS="$OUT/runs"
mkdir -p "$RUNS"
CACHE="${OMNI_CACHE:-$HOME/.cache/omni-engine}"
if [ -f .gpucache/cache.tar.xz ]; then
    CACHE=/tmp/omni-engine-cache
    mkdir -p "$CACHE" && tar xJf .gpucache/cache.tar.xz -C "$CACHE"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_check.log"
: > "$OUT/stages.jsonl"
# No registry is reachable on the GPU machine: install nothing that would need one.
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "editable install failed (PYTHONPATH used)" | tee -a "$LOG"
if compgen -G ".gpucache/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .gpucache/wheels/*.whl >>"$LOG" 2>&1 || echo "wheel install failed" | tee -a "$LOG"
fi

stage() {  # stage NAME SECONDS command...
    local name="$1" limit="$2" start=$SECONDS rc
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ! "$name" =~ $GPU_CHECK_ONLY ]]; then return; fi
    echo "=== $name: $* ($(date +%T))" | tee -a "$LOG"
    timeout "$limit" bash -c '"$@"' stage "$@" >>"$LOG" 2>&1  # bash -c: stages may be functions
    rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT/stages.jsonl"
}

train() {  # train RUN_NAME CONFIG args...
    local name="$1" config="$2"
    shift 2
    "$PY" pretrain_omni.py --config "examples/configs/$config.yaml" --data.cache_dir="$CACHE" \
        --train.output_dir="$RUNS/$name" --train.tensorboard=false --train.progress_bar=false \
        --checkpoint.interval=0 "$@"
}

env_report() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "capability", f"{p.major}.{p.minor}", "sms", p.multi_processor_count,
      "memory_gib", round(p.total_memory / 2**30, 1))
for mod in ("transformers", "triton", "tokenizers", "sentencepiece", "safetensors", "flash_attn"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:  # report, do not stop the check
        print(mod, "missing:", type(e).__name__)
EOF
}

export -f train env_report
export CACHE RUNS PY

# CPU references for the parity stage run in the background while the GPU works.
PARITY=(tiny_dense tiny_moe tiny_omni)
for c in "${PARITY[@]}"; do
    train "${c}_cpu" "$c" --train.device=cpu --train.steps=3 > "$RUNS/${c}_cpu.log" 2>&1 &
done

stage env 60 env_report
stage apis 60 "$PY" tools/check_torch_apis.py --json "$OUT/apis.json"
stage tests 120 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider
stage kernels 120 "$PY" -m benchmarks.gpu_kernels --out "$OUT/kernels.json"
stage syncs 120 "$PY" -m benchmarks.gpu_sync_audit --out "$OUT/syncs.json"
stage throughput 180 "$PY" -m benchmarks.bench_train --device cuda --dtype bf16 --attention packed \
    --attention-backend auto --hidden 2048 --layers 20 --heads 16 --kv-heads 8 --intermediate 5632 --vocab 8192 \
    --seq-len 4096 --batch 1 --steps 10 --warmup 3 --compile off --cache-dir "$CACHE" --out "$OUT/bench_train_1b.json"
stage fp8 90 train fp8_tiny_dense tiny_dense --train.device=cuda --train.dtype=fp8 --train.steps=30
stage fp8_ref 60 train bf16_tiny_dense tiny_dense --train.device=cuda --train.dtype=bf16 --train.steps=30
nccl_resume() {
    local run=(-m torch.distributed.run --standalone --nproc_per_node=1 pretrain_omni.py
               --config examples/configs/tiny_dense.yaml --data.cache_dir="$CACHE" --train.output_dir="$RUNS/nccl"
               --train.tensorboard=false --train.progress_bar=false --parallel.backend=nccl --train.device=cuda
               --checkpoint.interval=2)
    "$PY" "${run[@]}" --train.steps=4 && "$PY" "${run[@]}" --train.steps=6
}
export -f nccl_resume
stage nccl 90 nccl_resume
stage deterministic 60 train deterministic tiny_dense --train.device=cuda --train.deterministic=true --train.steps=3
stage omni_train 240 train omni_bf16 omni_digits --train.device=cuda --train.dtype=bf16
stage omni_eval 120 "$PY" -m omni_datasets.omni_digits.evaluate "$RUNS/omni_bf16" --out "$RUNS/omni_bf16"
for c in "${PARITY[@]}"; do
    stage "parity_${c}_fp32" 45 train "${c}_cuda_fp32" "$c" --train.device=cuda --train.steps=3
    stage "parity_${c}_bf16" 45 train "${c}_cuda_bf16" "$c" --train.device=cuda --train.dtype=bf16 --train.steps=3
done
stage moe_compile_ac 120 train moe_compile tiny_moe --train.device=cuda --train.dtype=bf16 --train.steps=20 \
    --train.compile=true --parallel.activation_checkpointing=true
wait

"$PY" - "$RUNS" "$OUT/summary.json" <<'EOF' | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    f = d / "metrics.jsonl"
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    if not recs:
        summary[d.name] = {"steps": 0}
        continue
    timed = recs[10:] or recs[1:] or recs  # skip warm-up / compilation steps
    row = {"steps": recs[-1]["step"], "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
           "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed),
           "mfu_median": statistics.median(r["mfu"] for r in timed) if timed[0].get("mfu") is not None else None,
           "peak_mem_gb": max((r.get("mem_gb") or 0) for r in recs)}
    ev = d / "eval.json"
    if ev.exists():
        row["eval"] = json.loads(ev.read_text())
    summary[d.name] = row
for name in ("tiny_dense", "tiny_moe", "tiny_omni"):
    cpu = summary.get(f"{name}_cpu", {}).get("first_loss")
    for v in ("cuda_fp32", "cuda_bf16"):
        gpu = summary.get(f"{name}_{v}", {}).get("first_loss")
        if cpu is not None and gpu is not None:
            summary[f"{name}_{v}"]["first_loss_rel_diff_vs_cpu"] = abs(gpu - cpu) / abs(cpu)
out.write_text(json.dumps(summary, indent=1))
print(f"{'run':<22}{'steps':>6}{'first loss':>12}{'last loss':>11}{'rel vs cpu':>12}{'tokens/s':>11}{'mfu':>8}{'mem GB':>8}")
for k, r in summary.items():
    if not r.get("steps"):
        print(f"{k:<22} no metrics")
        continue
    rel = r.get("first_loss_rel_diff_vs_cpu")
    mfu = r["mfu_median"]
    print(f"{k:<22}{r['steps']:>6}{r['first_loss']:>12.4f}{r['last_loss']:>11.4f}"
          f"{'' if rel is None else f'{rel:.1e}':>12}{r['tokens_per_s_median']:>11.0f}"
          f"{'' if mfu is None else f'{mfu:.2%}':>8}{r['peak_mem_gb']:>8.2f}")
EOF
