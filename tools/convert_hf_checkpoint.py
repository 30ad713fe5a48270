#!/usr/bin/env python
"""Convert between Hugging Face folders (Llama, Qwen2, Qwen3, Qwen3-MoE) and omni-engine checkpoints.

    # HF folder -> a folder training can start from (model.init_from)
    python tools/convert_hf_checkpoint.py import HF_DIR OUT_DIR
    python pretrain_omni.py --config examples/configs/tiny_dense.yaml --model.init_from=OUT_DIR

    # training checkpoint (sharded DCP), imported folder or HF folder -> HF folder
    python tools/convert_hf_checkpoint.py export outputs/run/checkpoints/step_00000100 OUT_DIR \\
        --config CONFIG.yaml --max-shard-size 5GB --dtype bfloat16

    # a Qwen3-MoE folder trains with expert parallelism straight away (each rank reads its experts)
    torchrun --nproc_per_node=2 pretrain_omni.py --config examples/configs/tiny_moe.yaml \
        --model.qk_norm=true --model.init_from=HF_DIR --parallel.ep_size=2

Only safetensors are read (no pickles, no remote code); tensors are streamed one at a
time, so memory stays near one shard. Qwen3-MoE experts: Hugging Face's per-expert
tensors (what save_pretrained writes) or fused `experts.gate_up_proj` tensors are both
read and stacked into our fused layout; export writes the per-expert form.
Mistakes print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> folder for model.init_from")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    exp = sub.add_parser("export", help="checkpoint (DCP step dir, imported or HF folder) -> Hugging Face folder")
    exp.add_argument("ckpt")
    exp.add_argument("out_dir")
    exp.add_argument("--config", help="training YAML (default: the config saved in the checkpoint)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    exp.add_argument("--tokenizer", help="tokenizer .model, tokenizer.json or folder (default: the data cache's "
                                         "tokenizer, or the imported model's files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from engine.checkpoint.convert import export_hf, import_hf
    from engine.checkpoint.safetensors_io import parse_size

    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.out_dir)
            print(f"imported into {out}; train from it with --model.init_from={out} (or --config {out}/config.yaml)")
        else:
            out = export_hf(args.ckpt, args.out_dir, config=args.config, max_shard_size=parse_size(args.max_shard_size),
                            dtype=args.dtype, tokenizer=args.tokenizer)
            print(f"exported to {out}")
    except ValueError as e:  # HFCheckpointError, ConfigError, bad sizes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
