"""train.compile=true (torch.compile per transformer block) keeps the seeds and the numbers of eager mode."""

import pytest
import torch

from engine.comm import DistContext
from engine.config import load_config
from engine.models import build_backbone
from engine.parallel import ParallelDims, materialize, parallelize
from engine.training.trainer import Trainer
from launch import TINY, assert_close

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")


def _config(tmp_path, *overrides):
    return load_config(TINY, [("train.steps", "3"), ("checkpoint.enabled", "false"), ("train.progress_bar", "false"),
                              ("train.output_dir", str(tmp_path)), *overrides])


def _built(cfg):
    dims = ParallelDims.from_layout({"dp_replicate": 1, "dp_shard": 1, "sp": 1, "ep": 1}, 1)
    with torch.device("meta"):
        model = build_backbone(cfg.model)
    model = parallelize(model, cfg, dims, None, "cpu")
    materialize(model, torch.device("cpu"), cfg.train.seed)
    return model


def _clean_state(model):
    return {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ac", [False, True], ids=["compile", "ac+compile"])
def test_compile_wraps_blocks_and_keeps_seeds(tmp_path, ac):
    eager = _built(_config(tmp_path))
    cfg = _config(tmp_path, ("train.compile", "true"), ("parallel.activation_checkpointing", str(ac).lower()))
    compiled = _built(cfg)
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in compiled.blocks.values())
    assert any("_orig_mod." in name for name, _ in compiled.named_parameters())  # the prefix init.py strips
    ref, got = _clean_state(eager), _clean_state(compiled)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "compile changed parameter-name seeding"


@pytest.mark.timeout(300)  # inductor compiles one block's forward + backward with gcc: ~40 s of CPU when cold
def test_compiled_losses_match_eager(tmp_path):
    """Same config and seed, 3 fp32 training steps through the real Trainer: losses within 1e-5 relative."""
    torch._dynamo.reset()
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        trainer = Trainer(_config(tmp_path / name, ("train.compile", flag)), CPU)
        runs[name] = [trainer.train_step()["loss"] for _ in range(3)]
        trainer.close()
    assert_close(runs["compiled"], runs["eager"], rel=1e-5)
    assert runs["eager"][-1] < runs["eager"][0]
