"""Activation checkpointing and torch.compile on MoE models: the same losses and first
gradients as the plain run, on one process, under EP 2, under EP 2 x Ulysses SP 2 (async,
overlapped dispatch) and on the omni-MoE model; the grouped GEMM under autocast."""

import pytest
import torch

from engine.comm import DistContext
from engine.config import load_config
from engine.ops.moe import expert_ffn
from engine.training.trainer import Trainer
from launch import ROOT, assert_close, assert_gradients_close, first_gradients

MOE = str(ROOT / "examples" / "configs" / "tiny_moe.yaml")
OMNI = str(ROOT / "examples" / "configs" / "tiny_omni.yaml")
# tiny_omni (synthetic payloads: seconds, no dataset build) with a MoE backbone
OMNI_MOE_KEYS = (("model.backbone", "moe"), ("model.num_experts", "8"), ("model.num_experts_per_tok", "2"),
                 ("model.moe_intermediate_size", "48"), ("model.router_aux_loss_coef", "0.01"))
CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")
AC = ("parallel.activation_checkpointing", "true")
COMPILE = ("train.compile", "true")


def _trainer(tmp_path, config, *overrides, steps=2):
    if config == OMNI:
        overrides = (*OMNI_MOE_KEYS, *overrides)
    cfg = load_config(config, [("train.steps", str(steps)), ("checkpoint.enabled", "false"),
                               ("train.progress_bar", "false"), ("train.tensorboard", "false"),
                               ("train.output_dir", str(tmp_path)), *overrides])
    return Trainer(cfg, CPU)


def _first_step(tmp_path, config, *overrides):
    """(every parameter's gradient, {loss: mean}) after the first forward/backward."""
    trainer = _trainer(tmp_path, config, *overrides)
    sums, counts = trainer.forward_backward()
    grads = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad.clone()
             for n, p in trainer.model.named_parameters() if p.grad is not None}
    step_losses = {k: (sums[k] / counts.get(k, 1)).item() for k in sums if counts.get(k, 1)}
    trainer.close()
    return grads, step_losses


def _losses(tmp_path, config, *overrides, steps=2):
    trainer = _trainer(tmp_path, config, *overrides, steps=steps)
    compiled = [isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in trainer.model.blocks.values()]
    assert all(compiled) if COMPILE in overrides else not any(compiled)
    out = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    return [r["loss"] for r in out], [r.get("aux_loss") for r in out]


@pytest.mark.parametrize("config", [MOE, OMNI], ids=["moe", "omni-moe"])
def test_checkpointing_keeps_losses_and_gradients_one_process(tmp_path, config):
    plain_g, plain_l = _first_step(tmp_path / "plain", config)
    ac_g, ac_l = _first_step(tmp_path / "ac", config, AC)
    assert_gradients_close(ac_g, plain_g, rel=1e-6)
    assert plain_l.keys() == ac_l.keys() and all(abs(ac_l[k] - plain_l[k]) <= 1e-6 * abs(plain_l[k]) for k in plain_l)
    assert any(".experts." in n for n in plain_g)
    # a second step: the router statistics recorded during recomputation must not leak
    assert_close(_losses(tmp_path / "ac2", config, AC)[0], _losses(tmp_path / "plain2", config)[0], rel=1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("config", [MOE, OMNI], ids=["moe", "omni-moe"])
def test_compiled_losses_match_eager_one_process(tmp_path, config):
    """fp32: 1e-5 relative over 3 steps (with checkpointing too); bf16 (autocast): compiled
    and eager both run the experts in bf16, within bf16 tolerance."""
    torch._dynamo.reset()
    eager, eager_aux = _losses(tmp_path / "eager", config, steps=3)
    compiled, compiled_aux = _losses(tmp_path / "compiled", config, COMPILE, AC, steps=3)
    assert_close(compiled, eager, rel=1e-5)
    assert_close(compiled_aux, eager_aux, rel=1e-4)
    if config == MOE:
        bf16 = ("train.dtype", "bf16")
        assert_close(_losses(tmp_path / "cbf16", config, COMPILE, bf16)[0],
                     _losses(tmp_path / "ebf16", config, bf16)[0], rel=5e-3)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return first_gradients(tmp_path_factory.mktemp("one"), 1, config=MOE, with_losses=True)


# Under EP and SP the reference is the plain one-process run (layouts match it to ~1e-7,
# test_expert_parallel.py), so one launch checks the layout and both features together
# (each alone is checked on one process above, checkpointing to 1e-6).
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("nproc,layout", [
    (2, ["--parallel.ep_size=2"]),
    (4, ["--parallel.ep_size=2", "--parallel.sp_size=2", "--parallel.sp_async=true", "--parallel.ep_overlap=true"]),
], ids=["ep2", "ep2xsp2-async-overlap"])
def test_checkpointing_and_compile_under_ep_and_sp(one_process, tmp_path, nproc, layout):
    features = ["--parallel.activation_checkpointing=true", "--train.compile=true"]
    ref_g, ref_l = one_process
    got_g, got_l = first_gradients(tmp_path, nproc, *layout, *features, config=MOE, with_losses=True)
    assert_gradients_close(got_g, ref_g, rel=1e-5)
    assert got_l.keys() == ref_l.keys() and all(abs(got_l[k] - ref_l[k]) <= 1e-5 * abs(ref_l[k]) for k in ref_l)


def test_grouped_gemm_follows_autocast():
    """Autocast casts Linear layers to bf16 but knows nothing of the grouped GEMM: the
    experts must compute in the autocast dtype too (the compiled kernel takes only bf16)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=gen)
    gate_up = torch.randn(3, 2 * 8, 16, generator=gen)
    down = torch.randn(3, 16, 8, generator=gen)
    counts = torch.tensor([5, 0, 7])
    assert expert_ffn(x, counts, gate_up, down).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_ffn(x, counts, gate_up, down)
    assert y.dtype == torch.bfloat16
    ref = expert_ffn(x.bfloat16(), counts, gate_up.bfloat16(), down.bfloat16())
    assert torch.equal(y, ref)
