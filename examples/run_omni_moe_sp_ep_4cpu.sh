#!/usr/bin/env bash
# The MoE omni model with every kind of parallelism at once on 4 CPU processes: FSDP over
# dp_shard 2 x sp 2, Ulysses SP 2 (async), EP 2 (overlapped dispatch).
#   bash examples/run_omni_moe_sp_ep_4cpu.sh [--section.key=value ...]
set -euo pipefail
source "$(dirname "$0")/launch.sh"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} launch 1 4 --config "$ROOT/examples/configs/tiny_omni_moe.yaml" \
    --parallel.dp_shard=2 --parallel.sp_size=2 --parallel.sp_async=true \
    --parallel.ep_size=2 --parallel.ep_overlap=true --train.output_dir=outputs/omni_digits_moe_4cpu "$@"
