"""Does this torch have every API the engine uses? One line per API, and exit 1 if any is missing.

The engine is developed against torch 2.13 (CPU) and meets older builds on GPU machines (torch
2.11 on this project's lent H100s): run this there first, before anything is trained. The list is
what the engine imports or calls by name, private helpers included, grouped by the feature
that needs it; a missing optional one (varlen attention) names the fallback.

    python tools/check_torch_apis.py [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys

# (feature, "module:attribute[.attribute]" or "module:callable(keyword)", required)
APIS = [
    ("FSDP2", "torch.distributed.fsdp:fully_shard", True),
    ("FSDP2", "torch.distributed.fsdp:fully_shard(ignored_params)", True),
    ("FSDP2", "torch.distributed.fsdp:FSDPModule.set_force_sum_reduction_for_comms", True),
    ("FSDP2", "torch.distributed.fsdp:FSDPModule.set_gradient_divide_factor", True),
    ("FSDP2", "torch.distributed.fsdp:FSDPModule.set_requires_gradient_sync", True),
    ("FSDP2", "torch.distributed.fsdp:register_fsdp_forward_method", True),
    ("FSDP2", "torch.distributed.fsdp:MixedPrecisionPolicy", True),
    ("DeviceMesh", "torch.distributed.device_mesh:init_device_mesh", True),
    ("DTensor", "torch.distributed.tensor:distribute_tensor", True),
    ("DTensor", "torch.distributed.tensor._utils:compute_local_shape_and_global_offset", True),
    ("checkpoints", "torch.distributed.checkpoint.state_dict:get_state_dict", True),
    ("checkpoints", "torch.distributed.checkpoint.state_dict:set_state_dict", True),
    ("checkpoints", "torch.distributed.checkpoint:async_save", True),
    ("checkpoints", "torch.distributed.checkpoint._nested_dict:flatten_state_dict", True),
    ("fake backend", "torch.testing._internal.distributed.fake_pg:FakeStore", True),
    ("activation checkpointing", "torch.utils.checkpoint:create_selective_checkpoint_contexts", True),
    ("activation checkpointing", "torch.utils.checkpoint:CheckpointPolicy.MUST_SAVE", True),
    ("activation checkpointing", "torch.distributed._composable:checkpoint", True),
    ("activation checkpointing", "torch.distributed.algorithms._checkpoint.checkpoint_wrapper:checkpoint_wrapper", True),
    ("activation checkpointing", "torch.utils._python_dispatch:_disable_current_modes", True),
    ("MoE", "torch:_grouped_mm", True),
    ("autocast", "torch:get_autocast_dtype", True),
    ("attention", "torch.nn.functional:scaled_dot_product_attention(enable_gqa)", True),
    ("attention (CUDA, optional: else sdpa)", "torch.nn.attention.varlen:varlen_attn", False),
    ("metrics", "torch.cuda:_get_nvml_device_index", False),
    ("compile", "torch.compiler:disable", True),
]


def check(spec: str) -> tuple[bool, str]:
    module_name, _, path = spec.partition(":")
    keyword = None
    if path.endswith(")"):
        path, keyword = path[:-1].split("(")
    try:
        obj = importlib.import_module(module_name)
        for part in path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        return False, f"{type(e).__name__}: {e}"
    if keyword is not None:
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):  # a builtin without a Python signature: look at its docstring
            return keyword in (obj.__doc__ or ""), "keyword looked up in the docstring"
        if keyword not in params:
            return False, f"no keyword {keyword!r}"
    return True, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    import torch

    rows, missing = [], 0
    print(f"torch {torch.__version__}")
    for feature, spec, required in APIS:
        ok, why = check(spec)
        missing += required and not ok
        rows.append({"feature": feature, "api": spec, "required": required, "present": ok, "note": why})
        print(f"{'ok     ' if ok else ('MISSING' if required else 'absent ')} {spec:<90} {feature}"
              + (f"  ({why})" if why and not ok else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "apis": rows}, f, indent=1)
    print(f"{missing} required API(s) missing" if missing else "every required API is present")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
