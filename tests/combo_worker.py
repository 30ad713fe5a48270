"""Train several configs for a few steps each inside one launch (one process group), and
write each one's losses: the combination matrix (test_combinations.py) pays the start-up
of torchrun, imports and gloo once per model instead of once per combination.

    torchrun --nproc_per_node N combo_worker.py CASES.json OUT.json

CASES.json: [{"name": ..., "config": YAML path, "overrides": [[key, value], ...]}, ...]; a case
with "fit": true runs Trainer.fit() (resume, checkpoints, metrics.jsonl) instead of bare steps.
OUT.json (rank 0): {name: {"loss": [...], "extra": {loss name: [...]}}}.
"""

import gc
import json
import sys

import torch

from engine.comm import init_distributed, shutdown
from engine.config import load_config
from engine.training.trainer import Trainer

cases_path, out_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
cases = json.loads(open(cases_path).read())
ctx = init_distributed("gloo", "cpu")
results = {}
for case in cases:
    cfg = load_config(case["config"], [tuple(kv) for kv in case["overrides"]])
    torch._dynamo.reset()
    trainer = Trainer(cfg, ctx)
    records = trainer.fit() if case.get("fit") else [trainer.train_step() for _ in range(cfg.train.steps)]
    results[case["name"]] = {"loss": [r["loss"] for r in records],
                             "extra": {k: [r[k] for r in records] for k in records[0] if k.startswith("loss_")}}
    trainer.close()
    del trainer
    gc.collect()
if ctx.is_main:
    with open(out_path, "w") as f:
        json.dump(results, f)
shutdown()
