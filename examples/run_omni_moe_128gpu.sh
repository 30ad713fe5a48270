#!/usr/bin/env bash
# A 32B-parameter omni MoE (Qwen3-30B-A3B-shaped backbone + vision, audio, image decoder) on
# 16 nodes x 8 GPUs: HSDP (2 replicas x 16-way FSDP), Ulysses SP 4 (async), EP 8 (overlapped),
# bf16, activation checkpointing; layout and model in examples/configs/omni_moe_30b_a3b.yaml.
# Run the same command on every node:
#   MASTER_ADDR=node0.example RUN_ID=omni-moe-1 bash examples/run_omni_moe_128gpu.sh [--section.key=value ...]
# NNODES / GPUS_PER_NODE override the shape (the config's layout must still multiply out:
# dp_replicate x dp_shard x sp_size = NNODES x GPUS_PER_NODE, or the run stops with one line).
set -euo pipefail
source "$(dirname "$0")/launch.sh"
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
launch "${NNODES:-16}" "${GPUS_PER_NODE:-8}" --config "$ROOT/examples/configs/omni_moe_30b_a3b.yaml" "$@"
