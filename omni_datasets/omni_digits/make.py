#!/usr/bin/env python
"""Build the omni-digits dataset (and, with --config, the VQ tokenizer a model needs).

    python -m omni_datasets.omni_digits.make                                    # ~/.cache/omni-engine/omni_digits_v1
    python -m omni_datasets.omni_digits.make --config examples/configs/omni_digits.yaml   # + VQ tokenizer, stream stats
    python -m omni_datasets.omni_digits.make --cache-dir /tmp/c --images-per-class 5 --voices en-us --speeds 150 --pitches 50

The build is deterministic given its options; it needs scikit-learn and espeak-ng (installed
with apt-get when missing and running as root). With --config the script also pre-trains
the image_vq tokenizer on the training images (cached in the dataset directory) and
reports, for the first --steps steps of the training stream, the tokens of each task and
the padding waste. --strict turns skipped samples into errors. Mistakes print one line
and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path


def stream_stats(cfg, steps: int, strict: bool) -> dict:
    from engine.models import part_layout

    from .source import build_omni_digits

    cfg.data.strict = strict
    t0 = time.perf_counter()
    data = build_omni_digits(cfg, part_layout(cfg.model))
    load_s = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    samples: dict[str, int] = {}
    padding = total = 0
    t0 = time.perf_counter()
    for step in range(steps):
        for r in range(cfg.data.global_batch_size):
            spec_rows = data.row(step, r)
            for s in spec_rows:
                kind = next(iter(s.payloads), "text")
                kinds[kind] = kinds.get(kind, 0) + len(s)
                samples[kind] = samples.get(kind, 0) + 1
            used = sum(len(s) for s in spec_rows)
            padding += cfg.data.seq_len - used
            total += cfg.data.seq_len
    batch_s = (time.perf_counter() - t0) / max(1, steps)
    return {"source": data.stats(), "load_seconds": round(load_s, 2), "rows_seconds_per_step": round(batch_s, 4),
            "steps_measured": steps, "tokens_by_part": kinds, "samples_by_part": samples,
            "padding_fraction": padding / max(1, total)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="training YAML: its data.cache_dir, and its image_vq decoder's tokenizer")
    parser.add_argument("--cache-dir", help="default: the config's data.cache_dir, else ~/.cache/omni-engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-class", type=int)
    parser.add_argument("--voices", nargs="+")
    parser.add_argument("--variants", nargs="+", help="espeak-ng variants, e.g. '' +f3 +m3")
    parser.add_argument("--speeds", nargs="+", type=int)
    parser.add_argument("--pitches", nargs="+", type=int)
    parser.add_argument("--sequences-per-combo", type=int)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rebuild", action="store_true", help="delete an existing build first")
    parser.add_argument("--strict", action="store_true", help="unusable samples are errors, not skipped")
    parser.add_argument("--steps", type=int, default=20, help="training steps whose rows are measured (--config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from engine.config import ConfigError, load_config

    from .build import BuildOptions, dataset_root, ensure_omni_digits, load_split, read_meta

    try:
        cfg = load_config(args.config) if args.config else None
        cache = Path(args.cache_dir or (cfg.data.cache_dir if cfg else "~/.cache/omni-engine")).expanduser()
        if cfg is not None:
            cfg.data.cache_dir = str(cache)
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in
                 {"seed": args.seed, "images_per_class": args.images_per_class, "voices": args.voices,
                  "variants": args.variants, "speeds": args.speeds, "pitches": args.pitches,
                  "sequences_per_combo": args.sequences_per_combo, "workers": args.workers}.items() if v is not None}
        opts = BuildOptions(**given)
        root = dataset_root(cache)
        if args.rebuild and root.exists():
            shutil.rmtree(root)
        existed = (root / "meta.json").is_file()
        t0 = time.perf_counter()
        ensure_omni_digits(cache, opts)
        took = time.perf_counter() - t0
        meta = read_meta(root)
        for split in ("train", "heldout"):  # validate every line and payload (errors name file:line)
            _, skipped = load_split(root, split, strict=args.strict)
            meta["stats"][split]["skipped"] = dict(skipped.counts)
        report = {"root": str(root), "built_now": not existed, "seconds": round(took, 2), **meta}
        report.pop("heldout_combos", None)
        if cfg is not None:
            from .vq_tokenizer import ensure_vq_tokenizer

            for spec in cfg.model.decoders:
                if spec.get("name") == "image_vq":
                    t0 = time.perf_counter()
                    path = ensure_vq_tokenizer(root, spec)
                    report.setdefault("vq_tokenizers", []).append(
                        {"file": str(path), "seconds_now": round(time.perf_counter() - t0, 1)})
            report["stream"] = stream_stats(cfg, args.steps, args.strict)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
