"""Activation-memory levers (engine/parallel/activation_memory.py): selective and full
checkpointing, offload to host memory, and checkpointing per omni part.

- parity: each lever gives the losses (3 fp32 steps, relative 1e-6) and the first-step
  gradients (relative 1e-6) of no lever, on one process for the dense, MoE and omni models,
  and (slow, one launch of 2 gloo ranks) under FSDP 2 and under SP 2 with EP 2;
- memory: tensors held between forward and backward order none > selective > full, per part
  too, and offload keeps them off the device (measured with benchmarks/live_bytes.py);
- selective checkpointing never sends a collective again in backward (the recorded data are
  replayed), where full checkpointing does;
- bad values are one-line ConfigErrors naming the key.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_activation_memory import SimulatedHostOffload
from benchmarks.live_bytes import LiveBytes
from engine.comm import DistContext, all_reduce_autograd, all_to_all, all_to_all_single, start_all_to_all
from engine.config import ConfigError, load_config
from engine.config_validation import validate
from engine.ops import moe as moe_ops
from engine.parallel import activation_memory
from engine.parallel.activation_memory import apply_activation_offload, apply_part_checkpointing, selective_contexts
from engine.training.trainer import Trainer
from launch import ROOT, assert_close, assert_gradients_close
from memory_levers_worker import run_case
from test_config_fuzz import assert_one_line_error, build_only, run_main  # noqa: F401 (fixture)

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")
CONFIGS = ROOT / "examples" / "configs"
MODELS = {"dense": "tiny_dense.yaml", "moe": "tiny_moe.yaml", "omni": "tiny_omni.yaml"}
AC = "parallel.activation_checkpointing"
LEVERS = {
    "selective": {"overrides": [(AC, "selective")]},
    "full": {"overrides": [(AC, "true")]},  # the old bool still means full
    "offload": {"overrides": [("parallel.activation_offload", "true")], "force_host_copy": True},
    "selective+offload": {"overrides": [(AC, "selective"), ("parallel.activation_offload", "true")],
                          "force_host_copy": True},
}
PART_LEVERS = {  # omni: per-part modes, with and without the backbone's
    "parts": {"parts": [("encoders", 0, "selective"), ("encoders", 1, "full"), ("decoders", 0, "full")]},
    "parts+full backbone": {"overrides": [(AC, "full")], "parts": [("encoders", 0, "full"), ("encoders", 1, True)]},
}


def case(name: str, model: str, out, lever: dict, *extra) -> dict:
    overrides = [("train.steps", "3"), ("checkpoint.enabled", "false"), ("train.progress_bar", "false"),
                 ("train.tensorboard", "false"), ("train.output_dir", str(out / name.replace("+", "_"))), *extra,
                 *lever.get("overrides", [])]
    return {"name": name, "config": str(CONFIGS / MODELS[model]), "overrides": overrides,
            "parts": lever.get("parts", []), "force_host_copy": lever.get("force_host_copy", False)}


def assert_same(got: dict, ref: dict, name: str) -> None:
    assert_close(got["loss"], ref["loss"], rel=1e-6)
    assert_gradients_close(got["grads"], ref["grads"], rel=1e-6)
    if "offload" in name:  # the hooks really moved tensors, and brought each back once
        assert got["offloaded"][0] > 10 and got["offloaded"][0] == got["offloaded"][1], got["offloaded"]


@pytest.mark.parametrize("model", list(MODELS))
def test_levers_keep_losses_and_gradients(tmp_path, model):
    levers = {**LEVERS, **(PART_LEVERS if model == "omni" else {})}
    ref = run_case(case("none", model, tmp_path, {}), CPU)
    assert ref["loss"][-1] < ref["loss"][0] and len(ref["grads"]) > 10
    for name, lever in levers.items():
        # as in a fresh process, the MoE layer's first forward probes the grouped GEMM (inside
        # the checkpointed block: the probe must stay out of the checkpoint's bookkeeping)
        moe_ops._GROUPED_OK.clear()
        assert_same(run_case(case(name, model, tmp_path, lever), CPU), ref, name)


# ---- memory ------------------------------------------------------------------------------------

def held_after_forward(model: str, tmp_path, overrides=(), parts=(), offload=None) -> int:
    """Bytes of the tensors created by one forward and still alive when it returns: what the
    backward will read (one tiny-config micro-batch; parameters are the baseline)."""
    base = [("train.output_dir", str(tmp_path)), ("checkpoint.enabled", "false"), ("train.progress_bar", "false")]
    cfg = load_config(str(CONFIGS / MODELS[model]), [*base, *overrides])
    for kind, index, mode in parts:
        getattr(cfg.model, kind)[index]["activation_checkpointing"] = mode
    validate(cfg)
    trainer = Trainer(cfg, CPU)
    if offload is not None:
        apply_activation_offload(trainer.model, offload)
    (batch,) = trainer.data.micro_batches(0, cfg.data.global_batch_size, 0, 1, cfg.data.global_batch_size)
    batch = trainer.prepare_batch(batch)
    gc.collect()
    with LiveBytes() as mem:
        sums = trainer.model.loss_sums(batch)
        gc.collect()  # garbage in reference cycles is not what the backward reads
        held = mem.current - mem.baseline
        sum(sums.values()).backward()
    trainer.close()
    return held


def test_selective_keeps_less_than_none_and_more_than_full(tmp_path):
    held = {mode: held_after_forward("dense", tmp_path, [(AC, mode)]) for mode in ("none", "selective", "full")}
    assert held["none"] > 1.2 * held["selective"] > 1.2 * 1.2 * held["full"] > 0, held
    omni = {mode: held_after_forward("omni", tmp_path, [(AC, mode)]) for mode in ("none", "selective", "full")}
    assert omni["none"] > omni["selective"] > omni["full"] > 0, omni


def test_part_checkpointing_keeps_less_of_that_part(tmp_path):
    none = held_after_forward("omni", tmp_path)
    vision = {m: held_after_forward("omni", tmp_path, parts=[("encoders", 0, m)]) for m in ("selective", "full")}
    both = held_after_forward("omni", tmp_path, parts=[("encoders", 0, "full"), ("encoders", 1, "full")])
    assert none > vision["selective"] > vision["full"] > both, (none, vision, both)


def test_offload_keeps_saved_tensors_off_the_device(tmp_path):
    """With the copy path on (host copies outside the tracker, as pinned memory would be),
    what stays 'on the device' between forward and backward drops to the small tensors, the
    parameters' views and the loss."""
    none = held_after_forward("dense", tmp_path)
    offload = SimulatedHostOffload()
    moved = held_after_forward("dense", tmp_path, offload=offload)
    assert moved < 0.2 * none and offload.bytes > 0.8 * none, (moved, none, offload.bytes)
    assert offload.packed == offload.unpacked > 10


def test_offload_hooks_leave_parameters_and_small_tensors():
    offload = activation_memory.ActivationOffload(force_copy=True)
    lin = nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    with offload.hooks():
        y = torch.tanh(lin(x)).sum()  # saves x, the weight's transpose (a view of a parameter), tanh's output
        small = (torch.randn(4, requires_grad=True) * 2).sum()  # 16 bytes: stays
    y.backward()
    small.backward()
    assert offload.packed == offload.unpacked == 2, (offload.packed, offload.unpacked)
    assert offload.bytes == 2 * 32 * 64 * 4
    ref = nn.Linear(64, 64)
    ref.load_state_dict(lin.state_dict())
    x2 = x.detach().clone().requires_grad_()
    torch.tanh(ref(x2)).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, ref.weight.grad)


# ---- collectives under selective checkpointing -----------------------------------------------

class CountCollectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += getattr(func, "namespace", None) == "c10d"
        return func(*args, **(kwargs or {}))


class Exchange(nn.Module):
    """Collectives of the kinds the engine's hooks issue: an autograd all-to-all (Ulysses, EP),
    an async one (sp_async, overlapped EP), a plain one (EP's count exchange), an autograd
    all-reduce (router statistics)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = all_to_all(torch.relu(self.a(x)), scatter_dim=1, gather_dim=1, axis="sp")
        h = start_all_to_all(torch.sigmoid(h) * h, scatter_dim=1, gather_dim=1, axis="sp").wait()
        counts = torch.empty(4, dtype=torch.long)
        all_to_all_single(counts, torch.arange(4), axis="ep")
        stats = all_reduce_autograd(h.pow(2).sum(0))
        return torch.tanh(self.b(h) * stats.softmax(-1)) * counts.sum()


@pytest.fixture
def gloo_world_1(tmp_path, monkeypatch):
    """A real one-rank gloo group that engine.comm takes for two ranks: it then issues every
    collective (a one-rank group is skipped), and gloo sends each rank's blocks to itself."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    for module in ("engine.comm.collectives", "engine.comm.all_to_all"):  # the package's names shadow the modules
        module = importlib.import_module(module)
        monkeypatch.setattr(module, "group_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    yield
    dist.destroy_process_group()


def test_selective_replays_collectives_instead_of_sending_them_again(gloo_world_1):
    torch.manual_seed(0)
    base = Exchange()
    x = torch.randn(8, 16)
    results = {}
    for mode in ("none", "selective", "full"):
        model = Exchange()
        model.load_state_dict(base.state_dict())
        extra = {"context_fn": selective_contexts} if mode == "selective" else {}
        wrapped = model if mode == "none" else checkpoint_wrapper(model, preserve_rng_state=False, **extra)
        counter = CountCollectives()
        with counter:
            loss = wrapped(x).sum()
        sent_forward, counter.calls = counter.calls, 0
        with counter:
            loss.backward()
        results[mode] = (loss.item(), sent_forward, counter.calls, {n: p.grad for n, p in model.named_parameters()})
    loss, fwd, bwd, grads = results["none"]
    assert fwd == 4 and bwd == 3  # the count exchange has no backward
    assert results["selective"][:3] == (loss, fwd, bwd)  # nothing sent again in backward
    assert results["full"][:3] == (loss, fwd, bwd + fwd)  # full recomputes the forward's exchanges too
    for mode in ("selective", "full"):
        assert all(torch.equal(results[mode][3][n], g) for n, g in grads.items()), mode


# ---- configuration ------------------------------------------------------------------------------

def test_checkpointing_values(tmp_path):
    tiny = str(CONFIGS / "tiny_dense.yaml")
    for raw, mode in (("true", "full"), ("false", "none"), ("selective", "selective"), ("none", "none")):
        assert load_config(tiny, [(AC, raw)]).parallel.activation_checkpointing == mode
    for bad in ("sometimes", "Full", "4", "[full]"):
        with pytest.raises(ConfigError, match=r"parallel\.activation_checkpointing.*none, full, selective"):
            load_config(tiny, [(AC, bad)])


BAD = [
    ("tiny_dense.yaml", [f"--{AC}=sometimes"], [AC, "sometimes", "none, full, selective"]),
    ("tiny_dense.yaml", [f"--{AC}=2"], [AC, "2", "none, full, selective"]),
    ("tiny_dense.yaml", ["--parallel.activation_offload=maybe"], ["parallel.activation_offload", "maybe"]),
    ("tiny_omni.yaml", ["--model.encoders=[{name: vision, activation_checkpointing: partly}]"],
     ["model.encoders[0].activation_checkpointing", "partly", "selective"]),
    ("tiny_omni.yaml", ["--model.decoders=[{name: image_vq, activation_checkpointing: 1}]"],
     ["model.decoders[0].activation_checkpointing", "1", "selective"]),
]


@pytest.mark.parametrize("config,argv,words", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_values_are_one_line_errors(config, argv, words, build_only):  # noqa: F811
    rc, stderr = run_main(str(CONFIGS / config), argv, build_only)
    assert_one_line_error(rc, stderr, words)


def test_decoder_without_repeated_layers_is_an_error():
    """A decoder's methods are called directly (not through __call__): with no ModuleList there
    is nothing per-part checkpointing could wrap, and the key must not be ignored silently."""
    model = SimpleNamespace(parts=lambda: {"plain": nn.Linear(2, 2)}, _where={"plain": ("decoders", 0)},
                            specs={"plain": {"name": "plain", "activation_checkpointing": "full"}})
    with pytest.raises(ConfigError, match=r"model\.decoders\[0\]\.activation_checkpointing.*no repeated layers"):
        apply_part_checkpointing(model)


# ---- several processes ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_levers_under_fsdp_and_sequence_parallel(tmp_path):
    """One launch of 2 gloo ranks: the omni model under FSDP 2 (dp_shard 2) with every lever and
    per-part checkpointing, the MoE model under SP 2 + EP 2 (Ulysses and expert all-to-alls,
    router all-reduce: collectives inside checkpointed blocks) with every lever."""
    cases = []
    fsdp = [("data.global_batch_size", "4")]
    sp_ep = [("parallel.sp_size", "2"), ("parallel.ep_size", "2"), ("data.global_batch_size", "2")]
    for name, lever in {"none": {}, **LEVERS, "parts": PART_LEVERS["parts"]}.items():
        cases.append(case(f"omni_fsdp/{name}", "omni", tmp_path, lever, *fsdp))
    for name, lever in {"none": {}, **LEVERS}.items():
        cases.append(case(f"moe_sp_ep/{name}", "moe", tmp_path, lever, *sp_ep))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "memory_levers_worker.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(tmp_path / "out.pt")
    assert list(results) == [c["name"] for c in cases]
    for layout in ("omni_fsdp", "moe_sp_ep"):
        ref = results[f"{layout}/none"]
        assert ref["loss"][-1] < ref["loss"][0]
        for name, got in results.items():
            if name.startswith(layout + "/"):
                assert_same(got, ref, name)


@pytest.mark.timeout(300)  # inductor compiles one block's forward + backward: ~40 s of CPU when cold
def test_selective_with_compile_keeps_losses(tmp_path):
    """Checkpointing comes before compile: the compiled block holds the selective checkpoint
    (traced whole, or run eagerly around compiled pieces where its region breaks the graph)."""
    torch._dynamo.reset()
    ref = run_case(case("none", "dense", tmp_path, {}), CPU)
    lever = {"overrides": [(AC, "selective"), ("train.compile", "true")]}
    got = run_case(case("compile+selective", "dense", tmp_path, lever), CPU)
    assert_close(got["loss"], ref["loss"], rel=1e-6)
    assert_gradients_close(got["grads"], ref["grads"], rel=1e-6)
