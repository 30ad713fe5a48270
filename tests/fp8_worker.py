"""Train a few steps of a config with train.dtype=fp8 under each torchao recipe, in one
launch (plain or under torchrun), and save {recipe: [loss per step]} as JSON (rank 0).

    python fp8_worker.py OUT.json STEPS --config ... --section.key=value ...
"""

import gc
import json
import sys

import torch

from engine.comm import init_distributed, shutdown
from engine.config import load_config, parse_overrides
from engine.training.trainer import Trainer

out_path, steps, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
torch.set_num_threads(1)
losses = {}
ctx = None
for recipe in ("rowwise", "tensorwise"):
    cfg = load_config(*parse_overrides([*argv, "--train.dtype=fp8", f"--train.fp8_recipe={recipe}"]))
    ctx = ctx or init_distributed(cfg.parallel.backend, "cpu")
    trainer = Trainer(cfg, ctx)
    losses[recipe] = [trainer.train_step()["loss"] for _ in range(steps)]
    trainer.close()
    del trainer
    gc.collect()
if ctx.is_main:
    with open(out_path, "w") as f:
        json.dump(losses, f)
shutdown()
