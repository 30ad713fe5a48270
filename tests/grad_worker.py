"""Run the first forward/backward of a config and save every parameter's full gradient
(OUT.pt) and the global batch's losses (OUT.pt.losses: {loss name: mean over its targets}).

    python grad_worker.py OUT.pt --config ... --section.key=value ...   (plain or under torchrun)

Under expert parallelism a rank holds only its experts' rows: those are gathered from the
EP group (after FSDP's full_tensor over ep_fsdp) into the global [experts, ...] tensor.
"""

import gc
import sys

import torch

from engine.comm import all_reduce, init_distributed, shutdown
from engine.config import load_config, parse_overrides
from engine.training.trainer import Trainer
from gradients import full_gradients

out_path, argv = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
cfg = load_config(*parse_overrides(argv))
ctx = init_distributed(cfg.parallel.backend, "cpu")
trainer = Trainer(cfg, ctx)
sums, counts = trainer.forward_backward()
totals = torch.stack([sums[k] for k in sums])
all_reduce(totals, axis="world")
step_losses = {k: t / counts[k] if k in counts else t for k, t in zip(sums, totals.tolist()) if counts.get(k, 1)}
grads = full_gradients(trainer)
if ctx.is_main:
    torch.save(grads, out_path)
    torch.save(step_losses, out_path + ".losses")
trainer.close()
del trainer
gc.collect()
shutdown()
