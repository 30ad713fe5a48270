#!/usr/bin/env python
"""Train an omni-engine model.

    python pretrain_omni.py                                  # default config, this machine
    python pretrain_omni.py --config examples/configs/tiny_dense.yaml --train.steps=20
    torchrun --nproc_per_node 4 pretrain_omni.py --config ... --parallel.dp_replicate=2

Configuration mistakes print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str]) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError, load_config, parse_overrides

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        path, overrides = parse_overrides(argv)
        cfg = load_config(path, overrides)
        from engine.training.trainer import run_training

        run_training(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
