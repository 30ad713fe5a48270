"""Train several configs inside one launch and save, for each, the losses of a few steps and
every parameter's full gradient after the first forward/backward (before clipping): the
memory-lever parity test (test_memory_levers.py) compares them between levers.

    torchrun --nproc_per_node N memory_levers_worker.py CASES.json OUT.pt

CASES.json: [{"name", "config", "overrides": [[key, value], ...], "parts": {part index: mode},
"force_host_copy": bool}]. OUT.pt (rank 0): {name: {"loss": [...], "grads": {name: tensor}}}.
"""

import gc
import json
import sys

import torch

from engine.comm import init_distributed, shutdown
from engine.config import load_config
from engine.config_validation import validate
from engine.parallel import activation_memory, plan
from engine.training.trainer import Trainer
from gradients import full_gradients


def run_case(case: dict, ctx) -> dict:
    cfg = load_config(case["config"], [tuple(kv) for kv in case["overrides"]])
    for kind, index, mode in case.get("parts", []):
        getattr(cfg.model, kind)[index]["activation_checkpointing"] = mode
    validate(cfg)
    activation_memory.FORCE_HOST_COPY = bool(case.get("force_host_copy"))
    offloads = []  # the offload the parallel layer applies, kept for its counters
    apply = plan.apply_activation_offload
    plan.apply_activation_offload = lambda model, *a: offloads.append(apply(model, *a)) or offloads[-1]
    try:
        trainer = Trainer(cfg, ctx)
    finally:
        plan.apply_activation_offload = apply
    grads = {}
    first = trainer.forward_backward

    def forward_backward():
        out = first()
        if not grads:
            grads.update(full_gradients(trainer))
        return out

    trainer.forward_backward = forward_backward
    losses = [trainer.train_step()["loss"] for _ in range(cfg.train.steps)]
    moved = (offloads[0].packed, offloads[0].unpacked) if offloads else None
    trainer.close()
    del trainer
    gc.collect()
    activation_memory.FORCE_HOST_COPY = False
    return {"loss": losses, "grads": grads, "offloaded": moved}


if __name__ == "__main__":
    cases_path, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", "cpu")
    results = {case["name"]: run_case(case, ctx) for case in json.loads(open(cases_path).read())}
    if ctx.is_main:
        torch.save(results, out_path)
    del results
    gc.collect()
    shutdown()
