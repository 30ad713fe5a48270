#!/usr/bin/env python
"""Tokenise a corpus once, in parallel processes, into memory-mapped token shards.

    python tools/prepare_data.py --config CONFIG.yaml --out data/prepared --processes 8
    python tools/prepare_data.py --config CONFIG.yaml --data.path='[web/*.jsonl]' --out data/web --processes 8
    python pretrain_omni.py --config CONFIG.yaml --data.path=data/prepared

The training config says what to tokenise and how (data.dataset text or conversations,
data.path, data.tokenizer or model.init_from's tokenizer, data.text_field,
data.chat_template, data.train_on); any --section.key=value overrides it. Training reads
the folder lazily (engine/data/token_shards.py). Without this tool, training tokenises
data.path on first use into the cache, in one process.

Bad rows are counted by reason (printed, and kept in the folder's prepared.json); with
--data.strict=true the first one is a one-line error. Mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    from engine.config import ConfigError, load_config, parse_overrides
    from engine.data.errors import DataError
    from engine.data.records import expand_data_paths
    from engine.data.sources import dataset_parts
    from engine.data.tokenize_corpus import prepare_folder
    from engine.data.user_data import encode_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the prepared folder to write (replaced if it exists)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--chunk-mb", type=float, default=16, help="JSONL bytes per work unit (and shard)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        path, overrides = parse_overrides(rest)
        cfg = load_config(path, overrides)
        d = cfg.data
        if d.dataset not in ("text", "conversations"):
            raise ConfigError(f"config key 'data.dataset'={d.dataset!r}: prepare_data tokenises text or "
                              "conversations; set --data.dataset")
        if not d.path:
            raise ConfigError("config key 'data.path' is empty: name the files to tokenise")
        if args.processes < 1:
            raise ConfigError(f"--processes={args.processes} must be >= 1")
        spec = encode_spec(cfg, dataset_parts(cfg))
        files = expand_data_paths(d.path)
        meta = prepare_folder(files, Path(args.out), spec, args.processes, d.strict,
                              chunk_bytes=int(args.chunk_mb * (1 << 20)))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: meta[k] for k in ("kind", "documents", "tokens", "skipped", "seconds")}
    summary["tokens_per_s"] = meta["tokens"] / meta["seconds"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
