#!/usr/bin/env bash
# The default omni model with FSDP over 2 CPU processes (gloo). Same global batches and, in
# fp32, the same losses as one process.
#   bash examples/run_omni_fsdp_2cpu.sh [--section.key=value ...]
set -euo pipefail
source "$(dirname "$0")/launch.sh"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} launch 1 2 --config "$ROOT/examples/configs/omni_digits.yaml" \
    --parallel.dp_shard=2 --train.output_dir=outputs/omni_digits_fsdp2 "$@"
