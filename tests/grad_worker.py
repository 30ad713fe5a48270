"""Run the first forward/backward of a config and save every parameter's full gradient.

    python grad_worker.py OUT.pt --config ... --section.key=value ...   (plain or under torchrun)
"""

import gc
import sys

import torch
from torch.distributed.tensor import DTensor

from engine.comm import init_distributed, shutdown
from engine.config import load_config, parse_overrides
from engine.training.trainer import Trainer

out_path, argv = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
cfg = load_config(*parse_overrides(argv))
ctx = init_distributed(cfg.parallel.backend, "cpu")
trainer = Trainer(cfg, ctx)
trainer.forward_backward()
grads = {}
for name, p in trainer.model.named_parameters():
    g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
if ctx.is_main:
    torch.save(grads, out_path)
trainer.close()
del trainer
gc.collect()
shutdown()
