#!/usr/bin/env python
"""Dry-run planner: does a config's layout fit the GPUs, and what does each mesh axis move?

    python tools/plan.py --config examples/configs/omni_moe_30b_a3b.yaml --world 128
    python tools/plan.py --config CFG --world 8 --device-memory-gb 141 --json plan.json --parallel.sp_size=2

One CPU process, nothing the size of the model allocated (the model is built on the meta
device). Prints, per rank: parameters, gradients and AdamW states under the config's
precision and sharding; FSDP's gathered buffers; the peak activations of one micro-batch
(per block, encoders, loss; under each activation_checkpointing mode); the bytes each mesh
axis moves per optimizer step; then FITS or DOES NOT FIT the device memory and, if it does
not, the config changes that would make it fit. The computation is
engine/parallel/memory_plan.py, the levers engine/parallel/plan_levers.py. Config mistakes
print the one line training prints and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2 ** 30


def _gb(n: float) -> str:
    return f"{n / GiB:9.2f} GiB" if n >= GiB else f"{n / 2 ** 20:9.2f} MiB"


def render(plan: dict) -> str:
    a, lay = plan["activations"], plan["layout"]
    lines = [f"world {plan['world']}: dp_replicate {lay['dp_replicate']} x dp_shard {lay['dp_shard']} x sp "
             f"{lay['sp']} (ep {lay['ep']}); micro-batch {lay['micro_batch']} x {lay['grad_accum']} accumulation "
             f"steps; {plan['dtype']}; activation checkpointing {a['mode']}"
             f"{', offload' if a['offload'] else ''}",
             f"parameters: {plan['params_total'] / 1e9:.3f} B ({plan['params_trainable'] / 1e9:.3f} B trainable)",
             "", "per rank                                   bytes"]
    for key, value in plan["states"].items():
        lines.append(f"  {key:<40} {_gb(value)}")
    for key, value in plan["fsdp_buffers"].items():
        lines.append(f"  {key:<40} {_gb(value)}")
    lines.append(f"  {'activations (peak of one micro-batch)':<40} {_gb(a['peak'])}")
    lines.append(f"  {'PEAK':<40} {_gb(plan['peak_bytes'])}")
    if plan["peak_bytes_moe_worst_case"] != plan["peak_bytes"]:
        lines.append(f"  {'PEAK, MoE worst-case routing':<40} {_gb(plan['peak_bytes_moe_worst_case'])}"
                     "   (every token of the EP group on this rank's experts)")
    lines += ["", f"activations ({a['tokens_per_rank']} tokens per rank per micro-batch, {a['text_rows']} of them "
                  "reaching the LM head)"]
    for section, terms in a["per_block"].items():
        if isinstance(terms, dict):
            for key, value in terms.items():
                if value:
                    lines.append(f"  {section + ': ' + key:<60} {_gb(value)}  per layer")
        elif terms:
            lines.append(f"  {section:<60} {_gb(terms)}")
    lines.append(f"  {'all blocks, saved (none) / kept (' + a['mode'] + ')':<60} {_gb(a['blocks_saved'])} / "
                 f"{_gb(a['blocks_kept']).strip()}")
    for name, e in a["encoders"].items():
        lines.append(f"  {'encoder ' + name + ' (' + e['full_note'] + ')':<60} {_gb(e['full_bytes'])}")
    if a["encoders"]:
        lines.append(f"  {'encoders, worst case: ' + a['encoder_case'][:34]:<60} {_gb(a['encoders_total'])}")
    for key, value in a["head"].items():
        lines.append(f"  {key:<60} {_gb(value)}")
    lines.append(f"  {'LM loss, transient (logits chunk or gradients)':<60} {_gb(a['loss_transient'])}")
    if a["host_bytes"]:
        lines.append(f"  {'offloaded to host memory':<60} {_gb(a['host_bytes'])}")
    modes = ", ".join(f"{k} {_gb(v).strip()}" for k, v in plan["activation_peak_by_mode"].items())
    lines.append(f"  activation peak by checkpointing mode: {modes}")
    lines += ["", "communication per optimizer step (bytes one rank sends)"]
    for axis, ops in plan["comm"].items():
        for op, n in ops.items():
            lines.append(f"  {axis:<32} {op:<16} {_gb(n)}")
    if not plan["comm"]:
        lines.append("  none (one rank)")
    budget = plan["device_memory_gb"]
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines += ["", f"{verdict}: peak {_gb(plan['peak_bytes']).strip()} of {budget:g} GiB per device "
                  "(tensors only: leave a few GiB for the CUDA context, kernels' scratch and fragmentation)"]
    for lever in plan.get("levers", []):
        if "error" in lever:
            lines.append(f"  {lever['change']}: not possible here ({lever['error']})")
        else:
            lines.append(f"  {lever['change']}: peak {_gb(lever['peak_gb'] * GiB).strip()}"
                         f" ({'fits' if lever['fits'] else 'does not fit'})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError, load_config, parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, required=True, help="ranks (GPUs) the layout runs on")
    parser.add_argument("--device-memory-gb", type=float, default=80.0, help="memory of one device, GiB")
    parser.add_argument("--json", help="also write the plan as JSON here")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.world < 1:
            raise ConfigError(f"--world={args.world} must be >= 1 (the number of ranks)")
        if not args.device_memory_gb > 0:
            raise ConfigError(f"--device-memory-gb={args.device_memory_gb} must be > 0")
        cfg = load_config(*parse_overrides(rest))
        from engine.checkpoint.weights import compose_from_init_from
        from engine.models.part_specs import check_part_names
        from engine.parallel.plan_levers import find_levers
        from engine.parallel.memory_plan import plan_layout

        cfg = compose_from_init_from(cfg)  # a released model's folder decides the model keys, as in training
        check_part_names(cfg.model)
        plan = plan_layout(cfg, args.world, args.device_memory_gb)
        if not plan["fits"]:
            plan["levers"] = find_levers(cfg, args.world, args.device_memory_gb)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
