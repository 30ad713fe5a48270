#!/usr/bin/env bash
# The default omni model on omni-digits, one CPU process (what `python pretrain_omni.py` does).
#   bash examples/run_omni_cpu.sh [--section.key=value ...]
set -euo pipefail
source "$(dirname "$0")/launch.sh"
launch 1 1 --config "$ROOT/examples/configs/omni_digits.yaml" "$@"
