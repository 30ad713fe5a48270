#!/usr/bin/env python
"""Peak RSS of `convert_hf_checkpoint.py import/export` on a multi-shard checkpoint (run by hand).

    python -m benchmarks.bench_convert_rss [--workdir /tmp/rss] [--hidden 1024 --layers 12 --vocab 32000]
    python -m benchmarks.bench_convert_rss --family qwen2-vl --workdir /tmp/rss_vl

Qwen2-VL (`--family qwen2-vl`) has no import step (init_from reads the release): it measures
loading the release into a 2-rank FSDP model (each rank reads its rows) and export
release -> release.

Builds a random Llama with transformers, saves it with max_shard_size=100MB, imports it,
writes a 2-rank FSDP DCP checkpoint of it (loaded with `model.init_from`'s streaming
loader), exports that, and prints peak RSS above each process's baseline (RSS after
imports) against the largest input file. Writes the table as JSON to WORKDIR/rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.common import ROOT, table

_STATUS = """
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
"""

# Runs in a fresh process: imports, records the baseline, resets the peak, converts, reports.
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch, safetensors.torch
    import torch.distributed.checkpoint
    from engine.checkpoint.convert import export_hf, import_hf
    from engine.checkpoint.safetensors_io import parse_size
""" + _STATUS + """
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    {call}
    print(json.dumps({{"baseline": base, "peak": status("VmHWM:")}}))
""")

# One rank of a 2-rank FSDP model ({setup}, then {model} built on meta, its {blocks} sharded)
# loading weights ({load}, returning bytes read) with its own shards paged in; then {after}.
_FSDP_LOAD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
""" + _STATUS + """
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    {setup}
    with torch.device("meta"):
        model = {model}
    for block in {blocks}:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()  # page in this rank's shards: the baseline includes them
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    read = {load}
    peak = status("VmHWM:")
    {after}
    print(json.dumps({{"rank": dist.get_rank(), "baseline": base, "peak": peak, "read": read}}))
    del model
    dist.destroy_process_group()
""")

_LLAMA = dict(setup="from engine.checkpoint.hf import WeightFolder, load_weights_; "
                    "from engine.models.dense import DenseTransformer; folder = WeightFolder({hf!r})",
              model="DenseTransformer(folder.model_config())", blocks="model.blocks.values()",
              load="load_weights_(model, folder)",
              after="import torch.distributed.checkpoint as dcp; "
                    "from torch.distributed.checkpoint.state_dict import get_model_state_dict; "
                    "dcp.save({{'model': get_model_state_dict(model)}}, checkpoint_id={out!r})")
_QWEN2_VL = dict(setup="from engine.checkpoint import qwen2_vl; from engine.models import build_model; "
                       "cfg, _ = qwen2_vl.config_from_hf(json.loads(Path({hf!r}, 'config.json').read_text()))",
                 model="build_model(cfg)", blocks="[*model.backbone.blocks.values(), *model.encoders['vision'].blocks]",
                 load="qwen2_vl.load_weights_(model, Path({hf!r}))", after="pass")


def fsdp_load_code(parts: dict, **values) -> str:
    return _FSDP_LOAD.format(**{k: v.format(**values) for k, v in parts.items()})


def run_python(code: str, nproc: int = 1) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if nproc == 1:
        cmd = [sys.executable, "-c", code]
    else:
        script = Path(env.get("TMPDIR", "/tmp")) / "bench_convert_rss_worker.py"
        script.write_text(code)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def largest(path: Path, pattern: str) -> int:
    return max(p.stat().st_size for p in path.glob(pattern))


def qwen2_vl_main(args) -> None:
    work = Path(args.workdir)
    hf, exp = work / "hf", work / "exported"
    if not (hf / "model.safetensors.index.json").is_file():
        run_python(textwrap.dedent(f"""
            import torch
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
            torch.manual_seed(0)
            cfg = Qwen2VLConfig(
                text_config=dict(vocab_size={args.vocab}, hidden_size={args.hidden}, intermediate_size={args.intermediate},
                                 num_hidden_layers={args.layers}, num_attention_heads=16, num_key_value_heads=8,
                                 rope_scaling={{"type": "mrope", "mrope_section": [8, 12, 12]}}),
                vision_config=dict(depth=8, embed_dim=512, num_heads=8, hidden_size={args.hidden}, patch_size=14,
                                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
                image_token_id=1, video_token_id=2, vision_start_token_id=3, vision_end_token_id=4)
            Qwen2VLForConditionalGeneration(cfg).save_pretrained({str(hf)!r}, max_shard_size={args.shard!r})
        """))
    mb, biggest = 1e6, largest(hf, "*.safetensors")
    total = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    rows = []
    for r in sorted(run_python(fsdp_load_code(_QWEN2_VL, hf=str(hf)), nproc=2),
                    key=lambda r: r["rank"]):
        rows.append((f"init_from load, FSDP rank {r['rank']}/2 (read {r['read'] / mb:.0f} MB)", biggest, r))
    call = f"export_hf({str(hf)!r}, {str(exp)!r}, max_shard_size=parse_size({args.shard!r}))"
    rows.append(("export release -> release", biggest, run_python(_MEASURE.format(call=call))[0]))
    print(f"Qwen2-VL: {total / mb:.0f} MB in {len(list(hf.glob('*.safetensors')))} safetensors shards "
          f"(largest {biggest / mb:.0f} MB)")
    report(rows, work)


def report(rows, work: Path) -> None:
    mb = 1e6
    out, cells = [], []
    for name, biggest, r in rows:
        delta = r["peak"] - r["baseline"]
        cells.append([name, f"{r['baseline'] / mb:.0f}", f"{r['peak'] / mb:.0f}", f"{delta / mb:.0f}",
                      f"{biggest / mb:.0f}", f"{delta / biggest:.2f}"])
        out.append({"step": name, "baseline_bytes": r["baseline"], "peak_bytes": r["peak"], "largest_input_bytes": biggest})
    print(table(["step", "baseline MB", "peak MB", "peak-base", "largest input", "ratio"], cells, align="lrrrrr"))
    (work / "rss.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/omni_rss")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--family", choices=("llama", "qwen2-vl"), default="llama")
    args = ap.parse_args()
    if args.family == "qwen2-vl":
        return qwen2_vl_main(args)
    work = Path(args.workdir)
    hf, imp, dcp_dir, exp = work / "hf", work / "imported", work / "dcp" / "step_00000001", work / "exported"
    if not (hf / "model.safetensors.index.json").is_file():
        run_python(textwrap.dedent(f"""
            import torch
            from transformers import LlamaConfig, AutoModelForCausalLM
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size={args.vocab}, hidden_size={args.hidden}, intermediate_size={args.intermediate},
                              num_hidden_layers={args.layers}, num_attention_heads=16, num_key_value_heads=8)
            AutoModelForCausalLM.from_config(cfg).save_pretrained({str(hf)!r}, max_shard_size={args.shard!r})
        """))
    mb = 1e6
    rows = []
    r = run_python(_MEASURE.format(call=f"import_hf({str(hf)!r}, {str(imp)!r})"))[0]
    rows.append(("import", largest(hf, "*.safetensors"), r))
    ranks = run_python(fsdp_load_code(_LLAMA, hf=str(hf), out=str(dcp_dir)), nproc=2)
    for r in sorted(ranks, key=lambda r: r["rank"]):
        rows.append((f"init_from load, FSDP rank {r['rank']}/2", max(largest(hf, "*.safetensors"), 0), r))
    (work / "config.yaml").write_text((imp / "config.yaml").read_text())
    call = (f"export_hf({str(dcp_dir)!r}, {str(exp)!r}, config={str(work / 'config.yaml')!r}, "
            f"max_shard_size=parse_size({args.shard!r}))")
    r = run_python(_MEASURE.format(call=call))[0]
    rows.append(("export (DCP, 2 files)", largest(dcp_dir, "*.distcp"), r))
    total = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    print(f"model: {total / mb:.0f} MB in {len(list(hf.glob('*.safetensors')))} safetensors shards "
          f"(largest {largest(hf, '*.safetensors') / mb:.0f} MB); export wrote {len(list(exp.glob('*.safetensors')))} "
          f"shards (largest {largest(exp, '*.safetensors') / mb:.0f} MB)")
    report(rows, work)


if __name__ == "__main__":
    main()
