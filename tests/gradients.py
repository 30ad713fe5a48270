"""Every parameter's full gradient after a backward, by its plain name: what the gradient parity
tests compare between layouts and levers (grad_worker.py, memory_levers_worker.py).

FSDP gradients are gathered with `full_tensor`; under expert parallelism a rank holds only its
experts' rows, gathered from the EP group into the global [experts, ...] tensor. Wrapper
prefixes (activation checkpointing, compile) are dropped from the names."""

import torch
from torch.distributed.tensor import DTensor


def full_gradients(trainer) -> dict[str, torch.Tensor]:
    grads = {}
    for mod_name, module in trainer.model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.grad is None:  # frozen
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            if getattr(module, "global_rows", None):  # EP: gather every rank's experts
                parts = [torch.empty_like(g) for _ in range(trainer.dims.ep)]
                torch.distributed.all_gather(parts, g.contiguous(), group=trainer.meshes.ep.get_group())
                g = torch.cat(parts)
            name = f"{mod_name}.{pname}".replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            grads[name] = g.detach().clone()
    return grads
