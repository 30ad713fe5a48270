#!/usr/bin/env bash
# The default omni model on one GPU in bf16 (fp32 master weights).
#   bash examples/run_omni_1gpu.sh [--section.key=value ...]
set -euo pipefail
source "$(dirname "$0")/launch.sh"
launch 1 1 --config "$ROOT/examples/configs/omni_digits.yaml" --train.device=cuda --train.dtype=bf16 \
    --train.output_dir=outputs/omni_digits_gpu "$@"
