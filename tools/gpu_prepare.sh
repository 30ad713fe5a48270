#!/usr/bin/env bash
# Prepare .gpucache/ for tools/gpu_check.sh on a GPU machine that reaches no registry: run this
# on a CPU machine with network, from the repository root, before handing the tree over. It packs
# the data cache (omni-digits, the Shakespeare corpus, tokenizers: ~40 MB) and downloads the
# pure-Python wheels the GPU machine lacks (torchao for train.dtype=fp8, liger-kernel for the
# fused loss). .gpucache/ is not committed; the device tool carries untracked files.
#
#   bash tools/gpu_prepare.sh [CACHE_DIR]      (default ~/.cache/omni-engine)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${1:-$HOME/.cache/omni-engine}"
python -m omni_datasets.omni_digits.make --cache-dir "$CACHE" >/dev/null   # builds it if missing
python -c "from engine.data.corpus import ensure_corpus; ensure_corpus('$CACHE')"
mkdir -p .gpucache/wheels
# only what the check reads: the prepared omni-digits folder, the corpus, the tokenizers
(cd "$CACHE" && tar cJf - omni_digits_v1 corpus.jsonl $(ls tokenizer_*.model 2>/dev/null)) > .gpucache/cache.tar.xz
# Python 3.12 on the GPU machine: liger-kernel is py3-none-any, torchao an abi3 wheel (cp310+)
pip download -q --no-deps --only-binary :all: --python-version 3.12 -d .gpucache/wheels "torchao==0.18.0" liger-kernel
du -sh .gpucache .gpucache/* | sed 's/^/  /'
